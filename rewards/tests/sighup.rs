//! Reloading the reward in place on a real SIGHUP. Its own test binary (process), since it
//! installs a process-wide signal handler.

use rewards::{ReloadableReward, Reward, Sample};

#[test]
fn sighup_rebuilds_from_the_config_file_and_keeps_the_old_reward_on_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("reward.toml");
    std::fs::write(&path, "[reward]\nkind = \"math\"\n").expect("write");
    let r = ReloadableReward::from_file(&path).expect("builds");
    r.install_sighup().expect("handler installed");
    let sample = Sample::new("\\boxed{4}", "4");
    assert_eq!(r.score(&sample).map(|s| s.value), Ok(1.0));

    // Swap to a length penalty and send SIGHUP to this process.
    std::fs::write(
        &path,
        "[reward]\nkind = \"length\"\nbudget = 2\npenalty_per_unit = 0.125\n",
    )
    .expect("write");
    // SAFETY: raise(3) has no memory-safety preconditions; the handler registered above only
    // sets an atomic flag.
    assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
    assert_eq!(
        r.score(&sample).map(|s| s.value),
        Ok(-0.875),
        "9 chars, 7 over budget"
    );
    assert_eq!(r.generation(), 1);

    // A broken config is reported and the current reward stays in service.
    std::fs::write(&path, "[reward]\nkind = \"nope\"\n").expect("write");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
    assert_eq!(r.score(&sample).map(|s| s.value), Ok(-0.875));
    assert_eq!(r.generation(), 1);
    assert!(r.last_error().expect("error kept").contains("nope"));

    // No signal, no reload: editing the file alone changes nothing.
    std::fs::write(&path, "[reward]\nkind = \"math\"\n").expect("write");
    assert_eq!(r.score(&sample).map(|s| s.value), Ok(-0.875));
    // An explicit request (e.g. from a control message) works like the signal.
    r.request_reload();
    assert_eq!(r.score(&sample).map(|s| s.value), Ok(1.0));
    assert_eq!((r.generation(), r.last_error()), (2, None));
}

#[test]
fn reload_flag_swaps_an_external_module_for_a_builtin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("reward.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/modules/python/math_reward.py");
    std::fs::write(
        &path,
        serde_json::json!({"kind": "external", "command": ["python3", script]}).to_string(),
    )
    .expect("write");
    let r = ReloadableReward::from_file(&path).expect("builds");
    let sample = Sample::new("The answer is 7.", "7");
    assert_eq!(r.score(&sample).map(|s| s.value), Ok(1.0));
    std::fs::write(&path, r#"{"kind": "format", "require": "boxed"}"#).expect("write");
    let flag = r.reload_flag();
    flag.store(true, std::sync::atomic::Ordering::Release);
    assert_eq!(r.score(&sample).map(|s| s.value), Ok(0.0));
}
