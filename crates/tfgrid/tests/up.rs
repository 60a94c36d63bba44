//! `tfgrid up`, the README's main command: comes up, registers the user's twin, stops on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test]
async fn up_serves_a_registry_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("grid");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tfgrid"))
        .args([
            "up",
            "--registry-listen",
            "127.0.0.1:0",
            "--relay-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut url = None;
    let mut twin = None;
    let mut relay = None;
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        let l = line.trim().to_string();
        line.clear();
        if let Some(rest) = l.strip_prefix("registry") {
            url = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(rest) = l.strip_prefix("relay") {
            relay = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(rest) = l.strip_prefix("your twin") {
            twin = Some(rest.trim().parse::<u32>().unwrap());
        }
        if l.starts_with("Ctrl-C stops the grid") {
            break;
        }
    }
    let url = url.expect("up prints the registry address");
    let client = tfgrid_registry_client::RegistryClient::new(&url);
    let key = tfgrid_core::Identity::load(&data.join("user.key")).unwrap();
    let acct = client.account(&key.public_key()).await.unwrap();
    assert_eq!(
        acct.twin_id, twin,
        "the printed twin is the user key's twin"
    );

    // The relay is up: the user's twin connects through it and a second twin pings it.
    let relay = relay.expect("up prints the relay address");
    let user_twin = twin.unwrap();
    assert_eq!(client.twin(user_twin).await.unwrap().relay, relay);
    let user = tfgrid_bus::Peer::start(tfgrid_bus::PeerConfig {
        identity: key,
        twin: user_twin,
        relay_url: relay.clone(),
        registry: client.clone(),
    });
    user.connected(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let other_id = tfgrid_core::Identity::generate();
    let signer = tfgrid_registry_client::TwinSigner::new(other_id.clone(), client.clone());
    let other_twin = tfgrid_bus::peer::ensure_registered(&signer, &relay)
        .await
        .unwrap();
    let other = tfgrid_bus::Peer::start(tfgrid_bus::PeerConfig {
        identity: other_id,
        twin: other_twin,
        relay_url: relay,
        registry: client.clone(),
    });
    other
        .connected(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let pong = other
        .call(
            user_twin,
            tfgrid_bus::peer::PING,
            b"",
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(pong, b"pong");

    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "Ctrl-C is a clean exit");
    assert!(rest.contains("stopped"), "{rest}");
    assert!(client.health().await.is_err(), "nothing left listening");
}
