//! `tfgrid zdb` as users run it: the real binary, restarted, killed with -9, its files damaged,
//! and spoken to with redis-cli.

use redis::Connection;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_tfgrid");

struct Zdb {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for Zdb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &Path) -> Zdb {
    let log = data.with_extension(format!("log{}", rand_suffix()));
    let mut child = Command::new(BIN)
        .args([
            "zdb",
            "--listen",
            "127.0.0.1:0",
            "--datasize",
            "65536",
            "--data",
        ])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn tfgrid zdb");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = match line.trim().strip_prefix("zdb listening on ") {
        Some(a) => a.to_string(),
        None => panic!(
            "zdb did not start: {line:?}; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    };
    Zdb { child, addr, log }
}

/// Runs `tfgrid zdb` on `data`, expecting it to refuse to start; returns what it printed.
fn start_fails(data: &Path) -> String {
    let out = Command::new(BIN)
        .args(["zdb", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .output()
        .unwrap();
    assert!(!out.status.success(), "zdb started on {}", data.display());
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

impl Zdb {
    fn conn(&self) -> Connection {
        redis::Client::open(format!("redis://{}/", self.addr))
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn set(c: &mut Connection, k: &str, v: &str) {
    let _: Vec<u8> = redis::cmd("SET").arg(k).arg(v).query(c).unwrap();
}

fn get(c: &mut Connection, k: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("GET").arg(k).query(c)
}

fn fill(c: &mut Connection, n: usize) {
    for i in 0..n {
        set(
            c,
            &format!("key{i}"),
            &format!("value-{i}-{}", "x".repeat(i % 50)),
        );
    }
}

fn assert_filled(c: &mut Connection, n: usize) {
    for i in 0..n {
        assert_eq!(
            get(c, &format!("key{i}")).unwrap(),
            Some(format!("value-{i}-{}", "x".repeat(i % 50))),
            "key{i}"
        );
    }
}

#[test]
fn restart_keeps_data_settings_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("zdb");
    let z = start(&data);
    let mut c = z.conn();
    fill(&mut c, 2000);
    set(&mut c, "key0", "newer");
    let _: String = redis::cmd("DEL").arg("key1").query(&mut c).unwrap();
    let _: String = redis::cmd("NSNEW").arg("users").query(&mut c).unwrap();
    let _: String = redis::cmd("NSSET")
        .arg("users")
        .arg("password")
        .arg("pw")
        .query(&mut c)
        .unwrap();
    z.stop();

    let z = start(&data);
    let mut c = z.conn();
    assert_eq!(get(&mut c, "key0").unwrap().as_deref(), Some("newer"));
    assert_eq!(get(&mut c, "key1").unwrap(), None);
    assert_eq!(
        get(&mut c, "key1999").unwrap(),
        Some(format!("value-1999-{}", "x".repeat(1999 % 50)))
    );
    let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(n, 1999);
    type Version = (Option<Vec<u8>>, String, String);
    let (prev, _, cur): Version = redis::cmd("HISTORY").arg("key0").query(&mut c).unwrap();
    assert_eq!(cur, "newer");
    let (_, _, old): Version = redis::cmd("HISTORY")
        .arg("key0")
        .arg(prev.unwrap())
        .query(&mut c)
        .unwrap();
    assert!(old.starts_with("value-0-"));
    let info: String = redis::cmd("NSINFO").arg("users").query(&mut c).unwrap();
    assert!(info.contains("password: yes"), "{info}");
    let r: redis::RedisResult<String> = redis::cmd("SELECT").arg("users").arg("bad").query(&mut c);
    assert!(r.is_err());
}

#[test]
fn kill_9_during_writes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("zdb");
    let z = start(&data);
    let acked = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (acked, stop) = (acked.clone(), stop.clone());
            let mut c = z.conn();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut p = redis::pipe();
                    let batch: Vec<(String, String)> = (0..8)
                        .map(|j| {
                            (
                                format!("w{w}-{i}-{j}"),
                                format!("v{}", "y".repeat((i as usize * 7 + j) % 300)),
                            )
                        })
                        .collect();
                    for (k, v) in &batch {
                        p.cmd("SET").arg(k).arg(v);
                    }
                    match p.query::<Vec<Vec<u8>>>(&mut c) {
                        Ok(_) => acked.lock().unwrap().extend(batch),
                        Err(_) => return,
                    }
                    i += 1;
                }
            })
        })
        .collect();
    while acked.lock().unwrap().len() < 20_000 {
        std::thread::sleep(Duration::from_millis(5));
    }
    z.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let z = start(&data);
    let mut c = z.conn();
    for chunk in acked.chunks(1000) {
        let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
        for ((k, v), g) in chunk.iter().zip(got) {
            assert_eq!(g.as_deref(), Some(v.as_str()), "acknowledged {k} lost");
        }
    }
    let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert!(n as usize >= acked.len());
}

/// What a kill -9 while a data file was being made can leave: before files were made under a
/// temporary name, an empty last data file (the next start refused it: "bad header", seen in
/// CI); now at most an unfinished `.new` file. Both start, lose nothing, and take new writes.
#[test]
fn a_data_file_cut_short_while_being_made_does_not_stop_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("zdb");
    let z = start(&data);
    let mut c = z.conn();
    let _: () = redis::cmd("SET")
        .arg("kept")
        .arg("yes")
        .query(&mut c)
        .unwrap();
    z.kill9();
    let ns = data.join("default");
    std::fs::write(ns.join("d00001"), b"").unwrap();
    std::fs::write(ns.join("d00002.new"), b"tfgr").unwrap();
    let z = start(&data);
    let mut c = z.conn();
    let got: Option<String> = redis::cmd("GET").arg("kept").query(&mut c).unwrap();
    assert_eq!(got.as_deref(), Some("yes"));
    // Enough writes to fill the 64 KiB data files and make new ones.
    for i in 0..2000 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg("v".repeat(100))
            .query(&mut c)
            .unwrap();
    }
    assert!(!ns.join("d00002.new").exists());
    assert!(ns.join("d00003").exists(), "no new data files were made");
    z.kill9();
    let z = start(&data);
    let mut c = z.conn();
    let got: Option<String> = redis::cmd("GET").arg("k1999").query(&mut c).unwrap();
    assert_eq!(got.as_deref(), Some("v".repeat(100).as_str()));
}

fn data_file(data: &Path) -> PathBuf {
    data.join("default").join("d00000")
}

#[test]
fn torn_tails_are_cut_and_a_lagging_index_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("zdb");
    let z = start(&data);
    fill(&mut z.conn(), 300);
    z.stop();
    // A torn write at the end of the data file, and the index's last entries gone.
    let mut bytes = std::fs::read(data_file(&data)).unwrap();
    bytes.extend_from_slice(&[0xD7, 0, 5, 100, 0, 0]);
    std::fs::write(data_file(&data), &bytes).unwrap();
    let index = data.join("default").join("index");
    let ilen = std::fs::metadata(&index).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&index)
        .unwrap()
        .set_len(ilen - 500)
        .unwrap();

    let z = start(&data);
    let mut c = z.conn();
    assert_filled(&mut c, 300);
    let info: String = redis::cmd("NSINFO").arg("default").query(&mut c).unwrap();
    assert!(info.contains("recovered_truncated_bytes: "), "{info}");
    assert!(
        !info.contains("recovered_truncated_bytes: 0\n"),
        "the torn bytes are reported: {info}"
    );
    assert!(z.log().contains("torn write"), "{}", z.log());
    // The cut entries were indexed again, and new writes land after them.
    set(&mut c, "after", "recovery");
    z.stop();
    let z = start(&data);
    let mut c = z.conn();
    assert_filled(&mut c, 300);
    assert_eq!(get(&mut c, "after").unwrap().as_deref(), Some("recovery"));
}

#[test]
fn flipped_bits_are_detected_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("zdb");
    let z = start(&data);
    let mut c = z.conn();
    set(&mut c, "victim", &"V".repeat(1000));
    fill(&mut c, 100);
    z.stop();
    // Flip a bit inside victim's value, in the middle of the data file.
    let path = data_file(&data);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(1000)
        .position(|w| w.iter().all(|&b| b == b'V'))
        .unwrap()
        + 500;
    bytes[at] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    // And a bit in the middle of the index.
    let index = data.join("default").join("index");
    let mut ib = std::fs::read(&index).unwrap();
    let mid = ib.len() / 2;
    ib[mid] ^= 0x10;
    std::fs::write(&index, &ib).unwrap();

    let z = start(&data);
    let mut c = z.conn();
    let log = z.log();
    assert!(
        log.contains("data damaged"),
        "damage reported at start: {log}"
    );
    assert!(log.contains("index damaged in the middle"), "{log}");
    let check: i64 = redis::cmd("CHECK").arg("victim").query(&mut c).unwrap();
    assert_eq!(check, 0);
    let err = get(&mut c, "victim").unwrap_err();
    assert!(format!("{err}").contains("corrupted"), "{err}");
    // Everything else is intact: the index was rebuilt from the data files.
    assert_filled(&mut c, 100);
    let check: i64 = redis::cmd("CHECK").arg("key5").query(&mut c).unwrap();
    assert_eq!(check, 1);
    let info: String = redis::cmd("NSINFO").arg("default").query(&mut c).unwrap();
    assert!(!info.contains("corrupt_regions: 0\n"), "{info}");
}

#[test]
fn a_damaged_file_header_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("zdb");
    let z = start(&data);
    set(&mut z.conn(), "k", "v");
    z.stop();
    let path = data_file(&data);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] = b'X';
    std::fs::write(&path, &bytes).unwrap();
    let err = start_fails(&data);
    assert!(
        err.contains("d00000") && err.contains("bad header"),
        "{err}"
    );
    // Nothing was changed by the failed start.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn redis_cli_works_against_it() {
    if Command::new("redis-cli").arg("--version").output().is_err() {
        eprintln!("SKIP: redis-cli is not installed (apt-get install redis-tools)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let z = start(&dir.path().join("zdb"));
    let (host, port) = z.addr.rsplit_once(':').unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-h", host, "-p", port])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["PING"]), "PONG");
    assert_eq!(cli(&["SET", "hello", "world"]), "hello");
    assert_eq!(cli(&["GET", "hello"]), "world");
    assert_eq!(cli(&["EXISTS", "hello"]), "1");
    assert_eq!(cli(&["NSNEW", "cli"]), "OK");
    assert!(cli(&["NSLIST"]).contains("cli"));
    assert!(cli(&["NSINFO", "cli"]).contains("name: cli"));
    assert_eq!(cli(&["DEL", "hello"]), "OK");
    assert_eq!(cli(&["DEL", "hello"]), "Key not found");
    assert_eq!(cli(&["GET", "hello"]), "");
}

#[test]
fn a_second_server_on_the_same_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("zdb");
    let z = start(&data);
    set(&mut z.conn(), "k", "v");
    let err = start_fails(&data);
    assert!(err.contains("in use by another zdb server"), "{err}");
    assert_eq!(get(&mut z.conn(), "k").unwrap().as_deref(), Some("v"));
}
