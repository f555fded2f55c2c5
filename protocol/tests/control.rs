//! Control channel handshake and messages (two threads; the cross-process case lives in the
//! workspace `tests` crate).

use std::time::Duration;

use protocol::control::{connect, ControlServer, Hello, Message};
use protocol::{ControlError, HandshakeError};

const T: Duration = Duration::from_secs(10);

fn hello(role: &str, layout_version: u32) -> Hello {
    Hello {
        role: role.into(),
        layout_version,
        model_hash: "m1".into(),
        manifest_hash: "abc".into(),
        policy_version: 0,
        batch_id: None,
    }
}

#[test]
fn handshake_then_messages_both_ways() {
    let server = ControlServer::new().expect("server");
    let name = server.name().to_owned();
    let client = std::thread::spawn(move || {
        let conn = connect(&name, hello("rollout-server", 1), T).expect("connect");
        assert_eq!(
            conn.recv(T).expect("recv"),
            Message::WeightsPublished { version: 7 }
        );
        conn.send(Message::Shutdown).expect("send");
        conn
    });
    let conn = server.accept(hello("learner", 1), T).expect("accept");
    assert_eq!(conn.peer().role, "rollout-server");
    conn.send(Message::WeightsPublished { version: 7 })
        .expect("send");
    assert_eq!(conn.recv(T).expect("recv"), Message::Shutdown);
    let client_conn = client.join().expect("client thread");
    drop(client_conn);
    assert!(matches!(conn.recv(T), Err(ControlError::Disconnected)));
}

#[test]
fn layout_mismatch_fails_on_both_sides_naming_both_values() {
    let server = ControlServer::new().expect("server");
    let name = server.name().to_owned();
    let client = std::thread::spawn(move || connect(&name, hello("rollout-server", 2), T));
    let server_err = server
        .accept(hello("learner", 1), T)
        .expect_err("server must fail");
    let client_err = client
        .join()
        .expect("thread")
        .expect_err("client must fail");
    for (err, local, remote) in [
        (&server_err, "1 (learner)", "2 (rollout-server)"),
        (&client_err, "2 (rollout-server)", "1 (learner)"),
    ] {
        match err {
            HandshakeError::Mismatch {
                field: "layout_version",
                local: l,
                remote: r,
            } => {
                assert_eq!((l.as_str(), r.as_str()), (local, remote));
            }
            other => panic!("expected mismatch, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("layout_version") && text.contains('1') && text.contains('2'),
            "{text}"
        );
    }
}

#[test]
fn accept_times_out_without_client() {
    let server = ControlServer::new().expect("server");
    assert!(matches!(
        server.accept(hello("learner", 1), Duration::from_millis(50)),
        Err(HandshakeError::Timeout(_))
    ));
}
