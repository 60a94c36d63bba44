//! The grid at scale, simulated (`tfgrid bench grid`, `tfgrid node --simulate`) at a size CI
//! affords: simulated nodes in several processes register over a real registry and relay, the
//! bot deploys replicas over them, the grid rests, and then one process is killed (kill -9: its
//! nodes die at once). The bench itself fails unless every replica ends up running on a live
//! node with exactly one live contract each; this checks that it succeeds and that nothing was
//! moved while the grid was at rest. No root is needed.

use std::process::Command;

#[test]
fn a_simulated_grid_heals_a_quarter_of_its_nodes_dying_at_once_and_moves_nothing_at_rest() {
    let out = Command::new(env!("CARGO_BIN_EXE_tfgrid"))
        .args([
            "bench",
            "grid",
            "--nodes",
            "120",
            "--replicas",
            "200",
            "--per-deployment",
            "5",
            "--processes",
            "4",
            "--rest-secs",
            "3",
            "--passes",
            "2",
            "--heal-timeout-secs",
            "120",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("running tfgrid bench grid");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench grid failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("120 simulated nodes in 4 processes up"),
        "{stdout}"
    );
    assert!(
        stdout.contains("deployed 200 replicas in 40 deployments"),
        "{stdout}"
    );
    assert!(
        stdout.contains("heal: 30 nodes killed at once")
            && stdout.contains("all running on live nodes")
            && stdout.contains("200 node contracts live"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("at rest the bot moved"),
        "a live node was taken for dead: {stdout}"
    );
}
