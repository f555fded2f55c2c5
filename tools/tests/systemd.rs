//! The deployment files in `deploy/`: the systemd units pass `systemd-analyze verify` against the
//! binaries this package builds, keep the invariants the two processes rely on (one shared
//! runtime directory, no ordering between them, ...), and the example config is one that
//! `nested-reft train` accepts.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 3] = [
    "nested-reft-learner.service",
    "nested-reft-rollout-server.service",
    "nested-reft.target",
];
const SERVICES: [&str; 2] = [UNITS[0], UNITS[1]];

/// Where the units install their binaries.
const INSTALLED_BIN_DIR: &str = "/usr/local/bin/";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The directory of the binaries built with this test: `nested-reft`, and next to it
/// `nested-reft-learner` and `nested-reft-rollout-server` (all `[[bin]]`s of this package are
/// built before its integration tests run).
fn built_bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_nested-reft"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read_unit(name: &str) -> String {
    let path = deploy_dir().join("systemd").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `key -> values` of a unit file (every section; comments and blank lines dropped).
fn settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';', '[']) {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a setting: {line}"));
        map.entry(k.trim().into())
            .or_default()
            .push(v.trim().into());
    }
    map
}

fn one<'a>(s: &'a BTreeMap<String, Vec<String>>, unit: &str, key: &str) -> &'a str {
    match s.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{unit}: expected exactly one {key}=, found {other:?}"),
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if let Err(e) = Command::new("systemd-analyze").arg("--version").output() {
        panic!(
            "cannot run systemd-analyze ({e}): install the `systemd` package \
             (apt-get install systemd); this test checks deploy/systemd/*.service with it"
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    let paths = units_with_built_binaries(tmp.path());

    let out = Command::new("systemd-analyze")
        .args(["verify", "--recursive-errors=no"])
        .args(&paths)
        .output()
        .expect("start systemd-analyze");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

/// The units written to `dir` with their ExecStart pointing at this build's binaries (they name
/// /usr/local/bin/<binary>, and `systemd-analyze` checks that each program exists and is
/// executable).
fn units_with_built_binaries(dir: &Path) -> Vec<PathBuf> {
    let bin_dir = built_bin_dir();
    let mut paths = Vec::new();
    for name in UNITS {
        let text = read_unit(name);
        let rewritten = text
            .lines()
            .map(|line| match line.strip_prefix("ExecStart=") {
                Some(cmd) => {
                    let program = cmd.split_whitespace().next().unwrap();
                    let binary = program.strip_prefix(INSTALLED_BIN_DIR).unwrap_or_else(|| {
                        panic!("{name}: ExecStart does not run a binary from {INSTALLED_BIN_DIR}")
                    });
                    let built = bin_dir.join(binary);
                    assert!(
                        built.is_file(),
                        "{name}: ExecStart runs `{binary}`, which this package does not build \
                         (no {})",
                        built.display()
                    );
                    format!("ExecStart={}{}", built.display(), &cmd[program.len()..])
                }
                None => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let path = dir.join(name);
        std::fs::write(&path, rewritten + "\n").unwrap();
        paths.push(path);
    }
    paths
}

/// Exposure of each service by `systemd-analyze security --offline=true` (0 is the best, 10
/// the worst): at most 2.0, i.e. no network, a system-call deny list, /proc and user isolation,
/// only pseudo-devices. Skipped, saying so, where systemd-analyze predates `--offline` (250).
#[test]
fn services_expose_at_most_2_of_10_to_the_offline_security_analysis() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = units_with_built_binaries(tmp.path());
    for path in paths
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
    {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(path)
            .output()
            .expect("start systemd-analyze");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if text.contains("unrecognized option") || text.contains("Unknown option") {
            eprintln!("skipped: this systemd-analyze has no --offline (systemd < 250): {text}");
            return;
        }
        let name = path.file_name().unwrap().to_string_lossy();
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("{name}: no overall exposure in:\n{text}"));
        let level: f64 = line
            .split(':')
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}: cannot read the level in {line:?}"));
        assert!(level <= 2.0, "{name}: exposure {level} > 2.0:\n{text}");
        // The deny list names the groups a trainer never needs.
        for group in [
            "@debug",
            "@module",
            "@mount",
            "@obsolete",
            "@reboot",
            "@swap",
            "@raw-io",
            "@cpu-emulation",
        ] {
            let open = format!("✗ SystemCallFilter=~{group} ");
            assert!(
                !text.contains(&open),
                "{name}: {group} is not denied:\n{text}"
            );
        }
    }
}

/// What verify cannot see: the settings the two processes rely on to find each other, to be
/// supervised, and to stop cleanly.
#[test]
fn services_share_what_the_two_processes_rely_on() {
    let units: Vec<_> = SERVICES
        .iter()
        .map(|&n| (n, settings(&read_unit(n))))
        .collect();
    for (name, s) in &units {
        for (key, want) in [
            ("Type", "notify"),
            ("NotifyAccess", "main"),
            ("Restart", "on-failure"),
            ("KillMode", "mixed"),
            ("KillSignal", "SIGTERM"),
            ("RemoveIPC", "no"),
            ("RuntimeDirectoryPreserve", "yes"),
            ("PartOf", "nested-reft.target"),
            ("WantedBy", "nested-reft.target"),
        ] {
            assert_eq!(one(s, name, key), want, "{name}: {key}=");
        }
        for key in [
            "WatchdogSec",
            "TimeoutStartSec",
            "TimeoutStopSec",
            "RestartSec",
        ] {
            one(s, name, key);
        }
        // The two start in parallel and wait for each other: any ordering would deadlock.
        for key in ["After", "Before", "Requires", "BindsTo", "Requisite"] {
            let other = SERVICES.iter().find(|&&o| o != *name).unwrap();
            let named = s.get(key).into_iter().flatten().any(|v| v.contains(other));
            assert!(!named, "{name}: {key}= names {other}");
        }
        // ipc-channel's listening socket is created under $TMPDIR; with a private /tmp per
        // unit the peer could not reach it unless TMPDIR is the shared runtime directory.
        if s.get("PrivateTmp").is_some_and(|v| v == &["yes"]) {
            let want = format!("TMPDIR=%t/{}", one(s, name, "RuntimeDirectory"));
            assert!(
                s.get("Environment")
                    .into_iter()
                    .flatten()
                    .any(|e| *e == want),
                "{name}: PrivateTmp=yes needs Environment={want}"
            );
        }
    }
    let (a, b) = (&units[0], &units[1]);
    for key in ["RuntimeDirectory", "User", "Group", "CacheDirectory"] {
        assert_eq!(
            one(&a.1, a.0, key),
            one(&b.1, b.0, key),
            "{key}= differs between the services"
        );
    }
    let target = settings(&read_unit(UNITS[2]));
    let wants: Vec<&str> = target["Wants"]
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    for service in SERVICES {
        assert!(
            wants.contains(&service),
            "nested-reft.target Wants= {wants:?}"
        );
    }
    assert_eq!(one(&target, UNITS[2], "WantedBy"), "multi-user.target");
}

#[test]
fn example_config_is_accepted_by_train() {
    let config = deploy_dir().join("config.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_nested-reft"))
        .args(["train", "--print-config", "--config"])
        .arg(&config)
        .output()
        .expect("start nested-reft");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nested-reft train --config {} --print-config: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        config.display(),
        out.status
    );
    // The effective configuration comes back as TOML.
    let printed: toml::Table = toml::from_str(&stdout).unwrap();
    assert!(printed.contains_key("update"), "{stdout}");
}
