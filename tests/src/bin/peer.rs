//! Helper peer for the cross-process tests. Each subcommand plays one role against real
//! shared memory and prints progress lines the test waits for.
//!
//! ```text
//! peer ring-produce DIR NAME START COUNT [--resume] [--hang-uncommitted ID]
//! peer ring-consume DIR NAME COUNT [--hang-on K]
//! peer weights-write DIR NAME ELEMS FROM TO [--resume] [--hang-mid]
//! peer weights-read DIR NAME ELEMS UNTIL
//! peer weights-pin-hang DIR NAME ELEMS
//! peer control-client SERVER_NAME LAYOUT_VERSION
//! peer ring-bench-peer --dir DIR --name NAME --record-bytes BYTES
//! ```

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use protocol::control::{connect, Hello, Message};
use protocol::{DType, Manifest, RolloutRing, WeightStore};
use tests::{desc, record, WATCHDOG};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["ring-produce", dir, name, start, count, rest @ ..] => {
            ring_produce(Path::new(dir), name, start.parse()?, count.parse()?, rest)
        }
        ["ring-consume", dir, name, count, rest @ ..] => {
            ring_consume(Path::new(dir), name, count.parse()?, rest)
        }
        ["weights-write", dir, name, elems, from, to, rest @ ..] => weights_write(
            Path::new(dir),
            name,
            elems.parse()?,
            from.parse()?,
            to.parse()?,
            rest,
        ),
        ["weights-read", dir, name, elems, until] => {
            weights_read(Path::new(dir), name, elems.parse()?, until.parse()?)
        }
        ["weights-pin-hang", dir, name, elems] => {
            weights_pin_hang(Path::new(dir), name, elems.parse()?)
        }
        ["control-client", server, version] => control_client(server, version.parse()?),
        ["ring-bench-peer", "--dir", dir, "--name", name, "--record-bytes", bytes] => {
            protocol::bench::run_ring_peer(Path::new(dir), name, bytes.parse()?)
                .context("while serving the ring benchmark")
        }
        _ => bail!("unknown peer command {args:?}"),
    }
}

fn hang() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn ring_produce(dir: &Path, name: &str, start: u64, count: u64, rest: &[&str]) -> Result<()> {
    let mut p = if rest.contains(&"--resume") {
        RolloutRing::resume(dir, name, desc(4)).context("while resuming the producer")?
    } else {
        RolloutRing::create(dir, name, desc(4)).context("while creating the ring")?
    };
    println!("ready generation={}", p.generation());
    for i in start..start + count {
        p.push(&record(i).as_view(), WATCHDOG)
            .with_context(|| format!("while pushing {i}"))?;
        println!("pushed {i}");
    }
    if let Some(pos) = rest.iter().position(|s| *s == "--hang-uncommitted") {
        let id: u64 = rest
            .get(pos + 1)
            .context("--hang-uncommitted needs an id")?
            .parse()?;
        let pending = loop {
            // Wait for space without committing anything further.
            match p.write_uncommitted(&record(id).as_view()) {
                Ok(pending) => break pending,
                Err(protocol::PushError::Full { .. }) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => return Err(e).context("while writing the uncommitted record"),
            }
        };
        println!("pending");
        let _keep = pending;
        hang();
    }
    Ok(())
}

fn ring_consume(dir: &Path, name: &str, count: u64, rest: &[&str]) -> Result<()> {
    let hang_on: Option<u64> = match rest {
        ["--hang-on", k] => Some(k.parse()?),
        [] => None,
        _ => bail!("bad ring-consume options {rest:?}"),
    };
    let mut c = RolloutRing::open(dir, name, desc(4)).context("while opening the ring")?;
    println!("ready");
    for n in 0..count {
        let id = c
            .pop_with(WATCHDOG, |r| {
                let rec = r.to_owned_record();
                if Some(n) == hang_on {
                    println!("reading {}", rec.prompt_id);
                    hang();
                }
                rec
            })
            .map_err(|e| anyhow::anyhow!("pop {n}: {e}"))
            .and_then(|rec| {
                anyhow::ensure!(
                    rec == record(rec.prompt_id),
                    "record {} differs",
                    rec.prompt_id
                );
                Ok(rec.prompt_id)
            })?;
        println!("got {id}");
    }
    Ok(())
}

fn manifest(elems: usize) -> Result<Manifest> {
    Ok(Manifest::new([
        ("a", vec![elems / 2], DType::U32),
        ("b", vec![elems - elems / 2], DType::U32),
    ])?)
}

fn fill(bytes: &mut [u8], value: u32) {
    for chunk in bytes.chunks_exact_mut(4) {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
}

fn weights_write(
    dir: &Path,
    name: &str,
    elems: usize,
    from: u32,
    to: u32,
    rest: &[&str],
) -> Result<()> {
    let m = manifest(elems)?;
    let mut w = if rest.contains(&"--resume") {
        WeightStore::resume(dir, name, &m).context("while resuming the writer")?
    } else {
        WeightStore::create(dir, name, &m, 2).context("while creating the store")?
    };
    println!("ready");
    for v in from..=to {
        let got = w
            .publish(WATCHDOG, |b| fill(b, v))
            .context("while publishing")?;
        anyhow::ensure!(got == u64::from(v), "published version {got}, expected {v}");
        println!("published {v}");
    }
    if rest.contains(&"--hang-mid") {
        let _ = w.publish(WATCHDOG, |b| {
            let half = b.len() / 2 / 4 * 4;
            fill(&mut b[..half], to + 1);
            println!("mid");
            hang();
        });
    }
    Ok(())
}

fn open_reader(dir: &Path, name: &str, m: &Manifest) -> Result<protocol::Reader> {
    let start = std::time::Instant::now();
    loop {
        match WeightStore::open(dir, name, m) {
            Ok(r) => return Ok(r),
            Err(e) if start.elapsed() > WATCHDOG => {
                return Err(e).context("while opening the store")
            }
            Err(_) => std::thread::sleep(Duration::from_micros(100)),
        }
    }
}

/// Snapshots in a loop; every snapshot must be uniform and equal to its version, and
/// versions must never go backwards.
fn weights_read(dir: &Path, name: &str, elems: usize, until: u64) -> Result<()> {
    let m = manifest(elems)?;
    let mut r = open_reader(dir, name, &m)?;
    println!("ready");
    let (mut snapshots, mut distinct, mut last) = (0u64, 0u64, 0u64);
    let start = std::time::Instant::now();
    while last < until {
        anyhow::ensure!(
            start.elapsed() < WATCHDOG,
            "watchdog: stuck at version {last}"
        );
        let pinned = match r.pin() {
            Ok(p) => p,
            Err(protocol::PinError::NothingPublished) => continue,
            Err(e) => return Err(e.into()),
        };
        let v = pinned.version();
        anyhow::ensure!(v >= last, "version went back from {last} to {v}");
        let expect = (v as u32).to_le_bytes();
        // Check, hold the pin across the writer's next publishes, check again.
        for pass in 0..2 {
            if let Some(pos) = pinned.bytes().chunks_exact(4).position(|c| c != expect) {
                bail!("snapshot of version {v} is not uniform at element {pos} (pass {pass})");
            }
            if pass == 0 {
                std::thread::sleep(Duration::from_micros(300));
            }
        }
        snapshots += 1;
        if v != last {
            distinct += 1;
            last = v;
        }
    }
    println!("done snapshots={snapshots} distinct={distinct}");
    Ok(())
}

fn weights_pin_hang(dir: &Path, name: &str, elems: usize) -> Result<()> {
    let m = manifest(elems)?;
    let mut r = open_reader(dir, name, &m)?;
    let pinned = r.pin().context("while pinning")?;
    println!("pinned {}", pinned.version());
    hang();
}

fn control_client(server: &str, layout_version: u32) -> Result<()> {
    let hello = Hello {
        role: "rollout-server".into(),
        layout_version,
        model_hash: "model".into(),
        manifest_hash: "manifest".into(),
        policy_version: 0,
        batch_id: None,
    };
    match connect(server, hello, WATCHDOG) {
        Ok(conn) => {
            println!("connected");
            match conn.recv(WATCHDOG) {
                Ok(Message::WeightsPublished { version }) => println!("weights {version}"),
                other => bail!("unexpected {other:?}"),
            }
            conn.send(Message::Shutdown)?;
            // Wait until the server closes its end, so the Shutdown is not lost.
            let _ = conn.recv(WATCHDOG);
            Ok(())
        }
        Err(e) => {
            println!("handshake error: {e}");
            Ok(())
        }
    }
}
