//! Control channel handshake between two real processes.

use protocol::control::{ControlServer, Hello, Message};
use protocol::HandshakeError;
use tests::{Peer, WATCHDOG};

const PEER: &str = env!("CARGO_BIN_EXE_peer");

fn hello(layout_version: u32) -> Hello {
    Hello {
        role: "learner".into(),
        layout_version,
        model_hash: "model".into(),
        manifest_hash: "manifest".into(),
        policy_version: 0,
        batch_id: None,
    }
}

#[test]
fn mismatched_layout_versions_fail_on_both_sides() -> anyhow::Result<()> {
    let server = ControlServer::new()?;
    let client = Peer::spawn(PEER, &["control-client", server.name(), "2"])?;
    let err = server
        .accept(hello(1), WATCHDOG)
        .expect_err("server must reject");
    assert!(
        matches!(
            err,
            HandshakeError::Mismatch {
                field: "layout_version",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "handshake mismatch on layout_version: local 1 (learner), remote 2 (rollout-server)"
    );
    let (lines, ok) = client.finish()?;
    assert!(ok);
    assert_eq!(
        lines,
        ["handshake error: handshake mismatch on layout_version: local 2 (rollout-server), remote 1 (learner)"]
    );
    Ok(())
}

#[test]
fn matched_handshake_carries_messages() -> anyhow::Result<()> {
    let server = ControlServer::new()?;
    let mut client = Peer::spawn(PEER, &["control-client", server.name(), "1"])?;
    let conn = server.accept(hello(1), WATCHDOG)?;
    client.expect_line("connected")?;
    conn.send(Message::WeightsPublished { version: 42 })?;
    assert_eq!(client.expect_line("weights")?, "weights 42");
    assert_eq!(conn.recv(WATCHDOG)?, Message::Shutdown);
    drop(conn);
    let (_, ok) = client.finish()?;
    assert!(ok);
    Ok(())
}
