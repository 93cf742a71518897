//! Faults beyond SIGKILL, each ending with tables equal to an oracle computed here: the daemon
//! frozen and thawed (SIGSTOP/SIGCONT) at random moments, an Apache Kafka broker stopped and
//! restarted under it, and its table directory running out of space (a small tmpfs).
//!
//! Each test runs `TIDEMARK_SOAK_ROUNDS` rounds of its fault (default 1); `scripts/soak.sh`
//! runs them for long.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

fn rounds() -> usize {
    std::env::var("TIDEMARK_SOAK_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

fn rng(name: &str) -> rand_chacha::ChaCha8Rng {
    let seed: u64 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("{name} seed {seed}");
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

fn run(config: &Path) -> Child {
    Command::new(BIN).arg("run").arg(config).stdout(Stdio::null()).spawn().unwrap()
}

/// Waits for the tables to equal the oracle over `events`, then stops the daemon cleanly.
fn finish_at_the_oracle(mut child: Child, dir: &Path, events: &[Sent]) {
    let expected = oracle(events, final_watermark_us(events));
    let expected_dlq = expected_dead_letters(events);
    assert!(!expected.is_empty());
    wait_for("the tables to equal the oracle", Duration::from_secs(120), || {
        as_rows(&read_views(&dir.join("views"))) == expected && read_dead_letters(&dir.join("dlq")) == expected_dlq
    });
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success(), "the daemon stops cleanly after the fault");
    assert_eq!(as_rows(&read_views(&dir.join("views"))), expected);
    assert_eq!(read_dead_letters(&dir.join("dlq")), expected_dlq);
}

/// Events arriving in chunks on another thread.
fn trickle(addr: &str, topic: &str, events: Vec<Sent>, chunk: usize, pause_ms: u64) -> std::thread::JoinHandle<()> {
    let (addr, topic) = (addr.to_string(), topic.to_string());
    std::thread::spawn(move || {
        for c in events.chunks(chunk) {
            produce_to(&addr, &topic, c);
            std::thread::sleep(Duration::from_millis(pause_ms));
        }
    })
}

/// Frozen for up to 2 s at random moments while events arrive: on thawing it carries on, and
/// nothing is lost or written twice.
#[test]
fn sigstop_and_sigcont_lose_and_duplicate_nothing() {
    let mut rng = rng("sigstop");
    for round in 0..rounds() {
        let dir = tempfile::tempdir().unwrap();
        let (mut broker, addr) = start_broker(dir.path(), &[format!("{TOPIC}:{PARTITIONS}")]);
        let config = dir.path().join("pipeline.toml");
        std::fs::write(&config, pipeline_toml("frozen", &addr, dir.path(), 2)).unwrap();
        let events = plan(300 + round as u64, 0, 12_000, 0.01, 0.02);
        let child = run(&config);
        let feed = trickle(&addr, TOPIC, events.clone(), 600, 150);
        while !feed.is_finished() {
            std::thread::sleep(Duration::from_millis(rng.random_range(50..600)));
            signal(&child, "STOP");
            std::thread::sleep(Duration::from_millis(rng.random_range(100..2_000)));
            signal(&child, "CONT");
        }
        feed.join().unwrap();
        finish_at_the_oracle(child, dir.path(), &events);
        let _ = broker.kill();
        let _ = broker.wait();
    }
}

/// The Apache Kafka broker is stopped mid-run and started again a few seconds later (same
/// data, same port): the daemon waits for it, then reads on from where it was, and the
/// anomaly-free click tables equal the oracle.
#[test]
fn an_apache_kafka_broker_stopped_and_restarted_mid_run() {
    let kafka_dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh");
    let kafka = |args: &[&str]| {
        let out = Command::new(&script).args(args).stderr(Stdio::inherit()).output().unwrap();
        assert!(out.status.success(), "scripts/kafka.sh {args:?} failed");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let kdir = kafka_dir.path().display().to_string();
    let addr = kafka(&["start", &kdir]);
    let mut rng = rng("broker restart");
    for round in 0..rounds() {
        let dir = tempfile::tempdir().unwrap();
        let topic = format!("restart-clicks-{round}");
        kafka::create_topics(&addr, &[(topic.as_str(), PARTITIONS)]);
        let config = dir.path().join("pipeline.toml");
        std::fs::write(&config, pipeline_toml_on(&topic, &format!("restart-{round}"), &addr, dir.path(), 2)).unwrap();
        let mut events = plan(400 + round as u64, 0, 20_000, 0.0, 0.02);
        produce_to(&addr, &topic, &events);
        let mut child = run(&config);
        wait_for("the first windows", Duration::from_secs(60), || {
            !read_views(&dir.path().join("views")).is_empty()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1_000)));
        kafka(&["stop", &kdir]);
        std::thread::sleep(Duration::from_millis(rng.random_range(1_000..5_000)));
        assert!(child.try_wait().unwrap().is_none(), "the daemon waits for the broker instead of exiting");
        let again = kafka(&["start", &kdir]);
        assert_eq!(again, addr, "the broker comes back on the same address");
        let more = plan(500 + round as u64, 20_000, 8_000, 0.02, 0.02);
        produce_to(&addr, &topic, &more);
        events.extend(more);
        finish_at_the_oracle(child, dir.path(), &events);
    }
    kafka(&["stop", &kdir, "--clean"]);
}

/// Mounts a tmpfs of `kib` KiB at `dir` (root only); unmounted when the guard drops.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, kib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a small tmpfs for the disk-full test needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    fn grow(&self, kib: u64) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={kib}k")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remounting the tmpfs larger failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The table directory fills up: the daemon stops with an error naming the problem (its
/// epochs stay pending in the state store), and once there is room again a restart delivers
/// them: the table equals the oracle, nothing lost or written twice.
#[test]
fn a_full_table_disk_stops_the_daemon_and_a_restart_with_room_delivers_everything() {
    for round in 0..rounds() {
        let dir = tempfile::tempdir().unwrap();
        let (mut broker, addr) = start_broker(dir.path(), &[format!("{TOPIC}:{PARTITIONS}")]);
        let views = Tmpfs::mount(&dir.path().join("views"), 256);
        let config = dir.path().join("pipeline.toml");
        std::fs::write(&config, pipeline_toml("full", &addr, dir.path(), 2)).unwrap();
        let mut events = plan(600 + round as u64, 0, 8_000, 0.0, 0.02);
        produce(&addr, &events);
        let log = dir.path().join("daemon.log");
        let mut child = Command::new(BIN)
            .arg("run")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // More and more small epochs until the 256 KiB are used up.
        let mut seq = 8_000;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(seq < 400_000, "the table never filled its 256 KiB");
            let more = plan(700 + seq as u64, seq, 2_000, 0.0, 0.0);
            produce(&addr, &more);
            events.extend(more);
            seq += 2_000;
            std::thread::sleep(Duration::from_millis(300));
        };
        let stderr = std::fs::read_to_string(&log).unwrap();
        assert!(!status.success(), "a full disk is an error");
        assert!(stderr.contains("No space left on device"), "the error names the full disk: {stderr}");
        views.grow(64 * 1024);
        finish_at_the_oracle(run(&config), dir.path(), &events);
        drop(views);
        let _ = broker.kill();
        let _ = broker.wait();
    }
}
