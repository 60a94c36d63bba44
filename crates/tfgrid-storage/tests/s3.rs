//! The S3 API with Debian's real S3 clients, s3cmd and rclone, against a store on real zdb
//! servers: buckets, put, list, get (whole and ranges), multipart, delete, and wrong
//! credentials refused.

mod common;

use std::process::{Command, Output};
use tfgrid_storage::{Pools, Store};

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

struct S3 {
    endpoint: String,
    id: String,
    secret: String,
    dir: tempfile::TempDir,
    pool: common::Pool,
    _rt: tokio::runtime::Runtime,
}

fn start() -> S3 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let p = common::pool(4, 2, 1 << 20);
    let (key, cfg) = (p.key.clone(), p.cfg.clone());
    let endpoint = rt.block_on(async move {
        let store = Store::open(key.clone(), cfg).await.unwrap();
        let pools = Pools::new(key);
        pools.insert(store);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(tfgrid_storage::s3::serve(l, pools));
        format!("127.0.0.1:{}", addr.port())
    });
    let (id, secret) = p.key.credentials();
    S3 {
        endpoint,
        id,
        secret,
        dir: tempfile::tempdir().unwrap(),
        pool: p,
        _rt: rt,
    }
}

impl S3 {
    fn s3cmd_with(&self, id: &str, secret: &str, args: &[&str]) -> Output {
        let cfg = self.dir.path().join(format!("s3cfg-{id}"));
        std::fs::write(
            &cfg,
            format!(
                "[default]\naccess_key = {id}\nsecret_key = {secret}\nhost_base = {e}\nhost_bucket = {e}\nuse_https = False\nsignature_v2 = False\nbucket_location = us-east-1\n",
                e = self.endpoint
            ),
        )
        .unwrap();
        Command::new("s3cmd")
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    }

    fn s3cmd(&self, args: &[&str]) -> String {
        let o = self.s3cmd_with(&self.id, &self.secret, args);
        assert!(
            o.status.success(),
            "s3cmd {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// rclone with a remote `tf:` for this endpoint, from the environment alone.
    fn rclone_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("rclone");
        c.args(args)
            .env("RCLONE_CONFIG", self.dir.path().join("rclone.conf"))
            .env("RCLONE_CONFIG_TF_TYPE", "s3")
            .env("RCLONE_CONFIG_TF_PROVIDER", "Other")
            .env(
                "RCLONE_CONFIG_TF_ENDPOINT",
                format!("http://{}", self.endpoint),
            )
            .env("RCLONE_CONFIG_TF_ACCESS_KEY_ID", &self.id)
            .env("RCLONE_CONFIG_TF_SECRET_ACCESS_KEY", &self.secret)
            .env("RCLONE_CONFIG_TF_FORCE_PATH_STYLE", "true")
            // A CA bundle in the environment makes rclone's S3 client refuse to start (its
            // transport cannot take one); plain HTTP needs none.
            .env_remove("AWS_CA_BUNDLE");
        c
    }

    fn rclone(&self, args: &[&str]) -> String {
        let o = self.rclone_cmd(args).output().unwrap();
        assert!(
            o.status.success(),
            "rclone {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn file(&self, name: &str, data: &[u8]) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p.to_string_lossy().into_owned()
    }
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

#[test]
fn s3cmd_puts_lists_gets_and_deletes() {
    if !have("s3cmd") {
        eprintln!("SKIP: s3cmd is not installed (apt-get install s3cmd)");
        return;
    }
    let s3 = start();
    s3.s3cmd(&["mb", "s3://photos"]);
    let small = random(4096, 1);
    let big = random(13 << 20, 2);
    let f_small = s3.file("small", &small);
    let f_big = s3.file("big", &big);
    s3.s3cmd(&["put", &f_small, "s3://photos/a/small"]);
    // 13 MiB in 5 MiB parts: a multipart upload.
    let o = s3.s3cmd_with(
        &s3.id,
        &s3.secret,
        &[
            "put",
            "--debug",
            "--multipart-chunk-size-mb=5",
            &f_big,
            "s3://photos/b/big",
        ],
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("Upload finished: 3 parts"),
        "not a multipart upload"
    );
    let ls = s3.s3cmd(&["ls", "--recursive", "s3://photos"]);
    assert!(
        ls.contains("s3://photos/a/small") && ls.contains("s3://photos/b/big"),
        "{ls}"
    );
    let ls = s3.s3cmd(&["ls", "s3://photos"]);
    assert!(ls.contains("DIR") && ls.contains("s3://photos/a/"), "{ls}");
    let got = s3.dir.path().join("got");
    for (key, want) in [("a/small", &small), ("b/big", &big)] {
        s3.s3cmd(&[
            "get",
            "--force",
            &format!("s3://photos/{key}"),
            got.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&got).unwrap() == *want,
            "{key} read back differs"
        );
    }
    let info = s3.s3cmd(&["info", "s3://photos/a/small"]);
    assert!(info.contains("4096"), "{info}");
    s3.s3cmd(&["del", "s3://photos/a/small", "s3://photos/b/big"]);
    assert!(!s3
        .s3cmd(&["ls", "--recursive", "s3://photos"])
        .contains("s3://photos/"));
    s3.s3cmd(&["rb", "s3://photos"]);
    assert!(!s3.s3cmd(&["ls"]).contains("s3://photos"));
}

#[test]
fn a_connection_that_sends_no_request_is_closed() {
    use std::io::{Read, Write};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let p = common::pool(2, 1, 1 << 20);
    let (key, cfg) = (p.key.clone(), p.cfg.clone());
    let addr = rt.block_on(async move {
        let pools = Pools::new(key.clone());
        pools.insert(Store::open(key, cfg).await.unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(tfgrid_storage::s3::serve_with(
            l,
            pools,
            std::time::Duration::from_millis(500),
        ));
        addr
    });
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let t = std::time::Instant::now();
    let mut buf = Vec::new();
    // The server ends the connection (perhaps with a 408): the read ends before its own timeout.
    let r = c.read_to_end(&mut buf);
    assert!(r.is_ok(), "the connection was held: {r:?}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn wrong_credentials_are_refused_and_change_nothing() {
    if !have("s3cmd") {
        eprintln!("SKIP: s3cmd is not installed (apt-get install s3cmd)");
        return;
    }
    let s3 = start();
    s3.s3cmd(&["mb", "s3://kept"]);
    let f = s3.file("x", b"hello");
    for (id, secret) in [
        (s3.id.as_str(), "0000000000000000000000000000000000000000"),
        ("TFG0000000000000000", s3.secret.as_str()),
    ] {
        let o = s3.s3cmd_with(id, secret, &["put", &f, "s3://kept/x"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "a PUT with wrong credentials succeeded"
        );
        assert!(
            err.contains("SignatureDoesNotMatch")
                || err.contains("InvalidAccessKeyId")
                || err.contains("NotSignedUp")
                || err.contains("403"),
            "{err}"
        );
    }
    assert!(!s3.s3cmd(&["ls", "s3://kept"]).contains("s3://kept/x"));
}

/// Shard keys in slot `i`'s namespace.
fn shard_keys(s3: &S3, i: usize) -> Vec<Vec<u8>> {
    let mut c = s3.pool.zdbs[i].conn(&s3.pool.cfg.slots[i]);
    common::keys(&mut c)
        .into_iter()
        .filter(|k| k[0] == b's')
        .collect()
}

#[test]
fn altered_shards_are_read_around_and_too_many_refused_with_the_reason() {
    if !have("s3cmd") {
        eprintln!("SKIP: s3cmd is not installed (apt-get install s3cmd)");
        return;
    }
    let s3 = start();
    s3.s3cmd(&["mb", "s3://vault"]);
    let data = random(600_000, 8);
    let f = s3.file("x", &data);
    s3.s3cmd(&["put", &f, "s3://vault/x"]);
    let key = shard_keys(&s3, 0).remove(0);
    let alter = |i: usize| {
        let mut c = s3.pool.zdbs[i].conn(&s3.pool.cfg.slots[i]);
        let mut v: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut c).unwrap();
        v[7] ^= 0xff;
        redis::cmd("SET")
            .arg(&key)
            .arg(v)
            .query::<()>(&mut c)
            .unwrap();
    };
    // Two of six altered (4+2): read around.
    alter(0);
    alter(1);
    let got = s3.dir.path().join("got");
    s3.s3cmd(&["get", "--force", "s3://vault/x", got.to_str().unwrap()]);
    assert!(std::fs::read(&got).unwrap() == data);
    // A third: refused, and the error says why.
    alter(2);
    let o = s3.s3cmd_with(
        &s3.id,
        &s3.secret,
        &["get", "--force", "s3://vault/x", got.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a stripe with 3 of 6 shards altered was served"
    );
    assert!(
        err.contains("unreadable") && err.contains("3 altered"),
        "{err}"
    );
}

#[test]
fn rclone_copies_lists_reads_ranges_and_deletes() {
    if !have("rclone") {
        eprintln!("SKIP: rclone is not installed (apt-get install rclone)");
        return;
    }
    let s3 = start();
    s3.rclone(&["mkdir", "tf:docs"]);
    let src = s3.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("one.txt", b"one\n".repeat(1000)),
        ("sub/two.bin", random(3 << 20, 3)),
        ("sub/empty", Vec::new()),
        // Over rclone's 200 MiB default cut-off is too slow for a test: its chunk size is set
        // below so this goes up in parts.
        ("large.bin", random(12 << 20, 4)),
    ];
    for (n, d) in &files {
        std::fs::write(src.join(n), d).unwrap();
    }
    s3.rclone(&[
        "copy",
        "--s3-upload-cutoff",
        "5M",
        "--s3-chunk-size",
        "5M",
        src.to_str().unwrap(),
        "tf:docs",
    ]);
    let ls = s3.rclone(&["ls", "tf:docs"]);
    for (n, d) in &files {
        assert!(ls.contains(&format!("{} {n}", d.len())), "{n} in {ls}");
    }
    // rclone check compares sizes and MD5s (ETags) of every file.
    s3.rclone(&["check", src.to_str().unwrap(), "tf:docs"]);
    let cat = s3
        .rclone_cmd(&[
            "cat",
            "--offset",
            "1000000",
            "--count",
            "100",
            "tf:docs/sub/two.bin",
        ])
        .output()
        .unwrap();
    assert_eq!(cat.stdout, files[1].1[1_000_000..1_000_100]);
    let back = s3.dir.path().join("back");
    s3.rclone(&["copy", "tf:docs", back.to_str().unwrap()]);
    for (n, d) in &files {
        assert!(std::fs::read(back.join(n)).unwrap() == *d, "{n} differs");
    }
    s3.rclone(&["delete", "tf:docs"]);
    assert!(s3.rclone(&["ls", "tf:docs"]).trim().is_empty());
    s3.rclone(&["rmdir", "tf:docs"]);
}
