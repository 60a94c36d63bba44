//! `tfgrid ssh` (into a VM over the user's network) and `tfgrid disk push` (a disk image as an
//! OCI artifact that `disk_image` names).

use crate::bot_cmd::{BotOpt, Client};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tfgrid_bot::store::Record;

#[derive(Args)]
pub struct SshArgs {
    /// The deployment.
    name: String,
    /// Which service (the first of the deployment when absent).
    #[arg(long)]
    service: Option<String>,
    #[arg(long, default_value_t = 0)]
    replica: u32,
    #[arg(long, short = 'l', default_value = "root")]
    user: String,
    /// Print the ssh command instead of running it.
    #[arg(long)]
    print: bool,
    /// Passed to ssh after the destination: options first (`-- -i KEY uptime`) or a command.
    #[arg(last = true)]
    args: Vec<String>,
    #[command(flatten)]
    opt: BotOpt,
}

/// The replica's address from the bot, then OpenSSH to it. The address is on the deployment's
/// private network: this machine reaches it once it joined (`tfgrid network access NAME`).
pub async fn ssh(a: SshArgs) -> Result<()> {
    let c = Client::new(&a.opt);
    let r: Record = c
        .get(&format!("/api/deployments/{}", a.name))
        .await?
        .json()
        .await?;
    let rep = r
        .replicas
        .iter()
        .find(|x| a.service.as_ref().is_none_or(|s| &x.service == s) && x.index == a.replica)
        .with_context(|| {
            format!(
                "{} has no replica {}{}",
                a.name,
                a.replica,
                a.service
                    .as_ref()
                    .map(|s| format!(" of service {s}"))
                    .unwrap_or_default()
            )
        })?;
    if rep.ip.is_empty() {
        bail!(
            "replica {} of {} has no address (state {}: {})",
            rep.index,
            rep.service,
            rep.state,
            rep.message
        );
    }
    let (opts, rest): (Vec<&String>, Vec<&String>) = {
        // ssh takes its options before the destination: leading `-x [value]` words stay there.
        let mut i = 0;
        while i < a.args.len() && a.args[i].starts_with('-') {
            let takes_value =
                a.args[i].len() == 2 && "BbcDEeFIiJLlmOoPpQRSWw".contains(&a.args[i][1..]);
            i += if takes_value { 2 } else { 1 };
        }
        let i = i.min(a.args.len());
        (a.args[..i].iter().collect(), a.args[i..].iter().collect())
    };
    let dest = format!("{}@{}", a.user, rep.ip);
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(opts).arg(&dest).args(rest);
    if a.print {
        let words: Vec<String> = std::iter::once("ssh".to_string())
            .chain(cmd.get_args().map(|s| s.to_string_lossy().into_owned()))
            .collect();
        println!("{}", words.join(" "));
        return Ok(());
    }
    let status = cmd
        .status()
        .context("running ssh (apt-get install openssh-client)")?;
    if !status.success() {
        let network = tfgrid_bot::spec::Spec::parse(&r.yaml)
            .map(|s| s.network_name().to_string())
            .unwrap_or_else(|_| a.name.clone());
        eprintln!(
            "ssh to {} ({} replica {}) failed; is this machine on the network? `tfgrid network access {}`",
            rep.ip, rep.service, rep.index, network
        );
        std::process::exit(status.code().unwrap_or(255));
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum DiskCmd {
    /// Publish a qcow2 or raw disk image to an OCI registry, for a vm's `disk_image`.
    Push {
        file: PathBuf,
        /// Where, e.g. 127.0.0.1:5000/debian:12
        reference: String,
        /// Speak plain HTTP (a local registry such as `tfgrid up`'s).
        #[arg(long)]
        plain_http: bool,
        /// user:password for the registry.
        #[arg(long, env = "TFGRID_REGISTRY_LOGIN", hide_env_values = true)]
        login: Option<String>,
    },
}

pub async fn disk(cmd: DiskCmd) -> Result<()> {
    match cmd {
        DiskCmd::Push {
            file,
            reference,
            plain_http,
            login,
        } => {
            let auth = match login.as_deref().map(|l| l.split_once(':')) {
                None => tfgrid_node::images::RegistryAuth::Anonymous,
                Some(Some((u, p))) => tfgrid_node::images::RegistryAuth::Basic(u.into(), p.into()),
                Some(None) => bail!("--login: expected user:password"),
            };
            let url = tfgrid_node::images::push_disk_image(&reference, &file, plain_http, &auth)
                .await
                .map_err(anyhow::Error::msg)?;
            println!("pushed {} as {reference} ({url})", file.display());
            Ok(())
        }
    }
}
