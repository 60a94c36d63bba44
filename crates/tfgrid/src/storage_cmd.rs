//! `tfgrid storage`: object storage pools through your bot (create, status, credentials, rm).

use crate::bot_cmd::{BotOpt, Client};
use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::Value;
use tfgrid_core::capacity::human_bytes;

#[derive(Subcommand)]
pub enum StorageCmd {
    /// Make a pool: data+parity zdb namespaces on as many distinct nodes, served over S3.
    Create {
        name: String,
        /// What it holds, e.g. 100G (each namespace gets size/data plus 1/16).
        #[arg(long)]
        size: String,
        /// data+parity: any `data` of the shards read an object back.
        #[arg(long, default_value = "16+4")]
        shards: String,
        /// Only nodes of these farms (comma-separated ids).
        #[arg(long, value_delimiter = ',')]
        farms: Vec<u32>,
        #[command(flatten)]
        opt: BotOpt,
    },
    /// Health, redundancy left, repair progress and events of your pools.
    Status {
        name: Option<String>,
        #[command(flatten)]
        opt: BotOpt,
    },
    /// The S3 endpoint and keys, with s3cmd and rclone settings.
    Credentials {
        #[command(flatten)]
        opt: BotOpt,
    },
    /// Remove a pool and every object in it.
    Rm {
        name: String,
        #[command(flatten)]
        opt: BotOpt,
    },
}

pub async fn storage(cmd: StorageCmd) -> Result<()> {
    match cmd {
        StorageCmd::Create {
            name,
            size,
            shards,
            farms,
            opt,
        } => {
            let mut yaml =
                format!("name: {name}\nstorage:\n  shards: \"{shards}\"\n  size: {size}\n");
            if !farms.is_empty() {
                let f: Vec<String> = farms.iter().map(|f| f.to_string()).collect();
                yaml.push_str(&format!("  placement: {{farms: [{}]}}\n", f.join(", ")));
            }
            crate::bot_cmd::deploy_yaml(opt, yaml, "tfgrid storage create").await
        }
        StorageCmd::Status { name, opt } => {
            let c = Client::new(&opt);
            let Some(v) = c.get_for_table(&opt, "/api/storage").await? else {
                return Ok(());
            };
            let pools: Vec<&Value> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|p| name.as_deref().is_none_or(|n| p["name"] == n))
                        .collect()
                })
                .unwrap_or_default();
            if pools.is_empty() {
                match name {
                    Some(n) => bail!("no storage pool {n}"),
                    None => println!("no storage pools (make one: tfgrid storage create NAME --size 10G --shards 4+2)"),
                }
                return Ok(());
            }
            for p in pools {
                print_pool(p);
            }
            Ok(())
        }
        StorageCmd::Credentials { opt } => {
            let c = Client::new(&opt);
            let Some(v) = c.get_for_table(&opt, "/api/storage/credentials").await? else {
                return Ok(());
            };
            let (e, id, secret) = (
                v["endpoint"].as_str().unwrap_or(""),
                v["access_key"].as_str().unwrap_or(""),
                v["secret_key"].as_str().unwrap_or(""),
            );
            let host = e.trim_start_matches("http://");
            println!("endpoint    {e}\naccess key  {id}\nsecret key  {secret}\n");
            println!("s3cmd (~/.s3cfg):\n  access_key = {id}\n  secret_key = {secret}\n  host_base = {host}\n  host_bucket = {host}\n  use_https = False\n  bucket_location = us-east-1   (s3cmd's default \"US\" is not a region S3 signatures accept)\n");
            println!("rclone (rclone.conf):\n  [tfgrid]\n  type = s3\n  provider = Other\n  endpoint = {e}\n  access_key_id = {id}\n  secret_access_key = {secret}\n  force_path_style = true");
            Ok(())
        }
        StorageCmd::Rm { name, opt } => {
            let c = Client::new(&opt);
            let r = c
                .http
                .delete(format!("{}/api/deployments/{name}", c.base))
                .send()
                .await;
            c.check(r).await?;
            println!("removed storage pool {name}");
            Ok(())
        }
    }
}

fn print_pool(p: &Value) {
    let name = p["name"].as_str().unwrap_or("?");
    if let Some(w) = p["waiting"].as_str() {
        println!("{name}: not open: {w}");
        return;
    }
    let s = &p["status"];
    let health = if s["healthy"].as_bool() == Some(true) {
        "healthy".to_string()
    } else {
        format!(
            "DEGRADED: {} of {} parity shards' worth of redundancy left",
            s["redundancy"], s["parity"]
        )
    };
    println!(
        "{name}  shards {}  {} buckets  {} objects  {}  {health}",
        s["shards"].as_str().unwrap_or("?"),
        s["buckets"],
        s["objects"],
        human_bytes(s["bytes"].as_u64().unwrap_or(0)),
    );
    if let Some(r) = s.get("repairing").filter(|r| !r.is_null()) {
        println!(
            "  repairing slot {}: {} of {} stripes, {} written",
            r["slot"],
            r["stripes_done"],
            r["stripes"],
            human_bytes(r["bytes_written"].as_u64().unwrap_or(0))
        );
    }
    for sl in s["slots"].as_array().into_iter().flatten() {
        let state = match (sl["up"].as_bool(), sl["whole"].as_bool()) {
            (Some(false), _) => "DOWN".to_string(),
            (_, Some(false)) => format!(
                "repair: {}",
                sl["repair"].as_str().unwrap_or("shards to rewrite")
            ),
            _ => "ok".to_string(),
        };
        println!(
            "  slot {:<3} {:<40} {state}",
            sl["index"],
            sl["zdb"].as_str().unwrap_or("")
        );
    }
    let events = s["events"].as_array().cloned().unwrap_or_default();
    for e in events.iter().rev().take(5).rev() {
        println!("  event: {}", e[1].as_str().unwrap_or(""));
    }
}
