//! The control channel between the learner and the rollout server, over `ipc-channel`.
//!
//! Bootstrap: the server creates a one-shot server and passes its name to the client (argument
//! or environment). The client creates both directions' channels, sends its [`Hello`] together
//! with the server's ends, and waits for the server's `Hello`. Both sides compare the two
//! `Hello`s field by field; a mismatch fails the handshake on both sides naming both values.

use std::sync::mpsc;
use std::time::Duration;

use ipc_channel::ipc::{self, IpcOneShotServer, IpcReceiver, IpcSender};
use ipc_channel::{IpcError, TryRecvError};
use serde::{Deserialize, Serialize};

use crate::error::{ControlError, HandshakeError};

/// What each side announces: the wire layouts it speaks and the model it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Role of the sender ("learner", "rollout-server", ...), for messages only.
    pub role: String,
    /// Layout version of the ring, weight store and control messages.
    pub layout_version: u32,
    /// Hash identifying the model (architecture, config, tokenizer).
    pub model_hash: String,
    /// Hash of the weight-store [`crate::Manifest`].
    pub manifest_hash: String,
    /// Where the sender stands, so that a restarted peer resynchronises (not compared). The
    /// learner: the policy version it has published (0: none yet). The rollout server: the
    /// version of the weights it generates with (0: none yet).
    pub policy_version: u64,
    /// The learner: the next batch it needs, one past the newest it received (`None`: none
    /// yet); a server whose ring lost the batches in between generates them again. The rollout
    /// server: the id of the next batch it will generate.
    pub batch_id: Option<u64>,
}

/// The CUDA IPC handles of the learner's device weight slots (one buffer and one
/// interprocess event per slot of the weight store): sent by the learner after every handshake,
/// opened by the rollout server with `cuda::DeviceSlotsView::open` (feature `cuda`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcHandles {
    /// `CUipcMemHandle` bytes per slot.
    pub memory: Vec<Vec<u8>>,
    /// `CUipcEventHandle` bytes per slot.
    pub events: Vec<Vec<u8>>,
    /// Bytes per slot (the manifest's total size).
    pub bytes: u64,
    /// Hex hash of the manifest the buffers are laid out by.
    pub manifest_hash: String,
    /// The weight store's writer generation these buffers belong to: a restarted learner
    /// allocates new ones, and a server loads a version through handles of its generation only.
    pub generation: u64,
}

/// Control messages after the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// Handshake greeting.
    Hello(Hello),
    /// The learner published weight version `version` in the weight store.
    WeightsPublished {
        /// The new version.
        version: u64,
    },
    /// The learner is done with batch `batch_id` (trained on it, or dropped it) and the
    /// weights of policy version `version` are published.
    Trained {
        /// The batch.
        batch_id: u64,
        /// The published version.
        version: u64,
        /// The learner's estimate of the per-token KL(μ‖π) between the behavior that
        /// generated the batch and the policy it trained (k3 estimator; NaN when the batch
        /// trained no tokens). The adaptive plan strategy steers by it.
        kl_behavior: f64,
    },
    /// The rollout server loaded weight version `version` and scored the fixed probe
    /// completion with the model it samples from (re-quantized for an 8-bit behavior): the
    /// per-token log-probs, for the learner to compare with its own of that version.
    Probe {
        /// The version the server loaded.
        version: u64,
        /// Log-probs of the probe completion's tokens.
        logprobs: Vec<f32>,
    },
    /// The learner's weights live in CUDA device slots: their handles (sent once per
    /// connection, before the server loads weights; a server without CUDA refuses them).
    DeviceSlots(IpcHandles),
    /// Stop after the current step.
    Shutdown,
    /// The sender failed; human-readable reason.
    Error {
        /// What went wrong.
        message: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Bootstrap {
    hello: Hello,
    to_client: IpcSender<Message>,
    from_client: IpcReceiver<Message>,
}

/// One end of an established control channel.
#[derive(Debug)]
pub struct Connection {
    tx: IpcSender<Message>,
    rx: IpcReceiver<Message>,
    peer: Hello,
}

impl Connection {
    /// The peer's greeting.
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    /// Sends a message.
    pub fn send(&self, msg: Message) -> Result<(), ControlError> {
        self.tx
            .send(msg)
            .map_err(|e| ControlError::Channel(e.to_string()))
    }

    /// Receives the next message, waiting up to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Message, ControlError> {
        match self.rx.try_recv_timeout(timeout) {
            Ok(m) => Ok(m),
            Err(TryRecvError::Empty) => Err(ControlError::Timeout(timeout)),
            Err(TryRecvError::IpcError(IpcError::Disconnected)) => Err(ControlError::Disconnected),
            Err(TryRecvError::IpcError(e)) => Err(ControlError::Channel(e.to_string())),
        }
    }
}

/// Compares two greetings; the error names the first differing field with both values.
pub fn check_hello(local: &Hello, remote: &Hello) -> Result<(), HandshakeError> {
    let fields = [
        (
            "layout_version",
            local.layout_version.to_string(),
            remote.layout_version.to_string(),
        ),
        (
            "model_hash",
            local.model_hash.clone(),
            remote.model_hash.clone(),
        ),
        (
            "manifest_hash",
            local.manifest_hash.clone(),
            remote.manifest_hash.clone(),
        ),
    ];
    for (field, l, r) in fields {
        if l != r {
            return Err(HandshakeError::Mismatch {
                field,
                local: format!("{l} ({})", local.role),
                remote: format!("{r} ({})", remote.role),
            });
        }
    }
    Ok(())
}

/// The listening side before a client connects.
pub struct ControlServer {
    server: IpcOneShotServer<Bootstrap>,
    name: String,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("name", &self.name)
            .finish()
    }
}

impl ControlServer {
    /// Creates the one-shot server; pass [`Self::name`] to the client process.
    pub fn new() -> Result<Self, HandshakeError> {
        let (server, name) =
            IpcOneShotServer::new().map_err(|e| HandshakeError::Channel(e.to_string()))?;
        Ok(Self { server, name })
    }

    /// The name a client connects to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits up to `timeout` for the client, then exchanges and checks greetings. On a
    /// mismatch the server still sends its `Hello`, so the client reports the same fields.
    pub fn accept(self, local: Hello, timeout: Duration) -> Result<Connection, HandshakeError> {
        // `accept` has no timeout of its own: run it on a helper thread. On timeout that thread
        // stays blocked until the process exits (or a client finally connects and is dropped).
        let (done_tx, done_rx) = mpsc::channel();
        let server = self.server;
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || {
                let _ = done_tx.send(server.accept().map(|(_, b)| b));
            })
            .map_err(|e| HandshakeError::Channel(e.to_string()))?;
        let boot = match done_rx.recv_timeout(timeout) {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(HandshakeError::Channel(e.to_string())),
            Err(_) => return Err(HandshakeError::Timeout(timeout)),
        };
        boot.to_client
            .send(Message::Hello(local.clone()))
            .map_err(|e| HandshakeError::Channel(e.to_string()))?;
        check_hello(&local, &boot.hello)?;
        Ok(Connection {
            tx: boot.to_client,
            rx: boot.from_client,
            peer: boot.hello,
        })
    }
}

/// Connects to the server called `name`, sends `local` and checks the server's reply.
pub fn connect(name: &str, local: Hello, timeout: Duration) -> Result<Connection, HandshakeError> {
    let chan = |e: std::io::Error| HandshakeError::Channel(e.to_string());
    let boot_tx: IpcSender<Bootstrap> = IpcSender::connect(name.to_owned()).map_err(chan)?;
    let (to_client, from_server) = ipc::channel::<Message>().map_err(chan)?;
    let (to_server, from_client) = ipc::channel::<Message>().map_err(chan)?;
    boot_tx
        .send(Bootstrap {
            hello: local.clone(),
            to_client,
            from_client,
        })
        .map_err(|e| HandshakeError::Channel(e.to_string()))?;
    let peer = match from_server.try_recv_timeout(timeout) {
        Ok(Message::Hello(h)) => h,
        Ok(other) => return Err(HandshakeError::Unexpected(format!("{other:?}"))),
        Err(TryRecvError::Empty) => return Err(HandshakeError::Timeout(timeout)),
        Err(TryRecvError::IpcError(e)) => return Err(HandshakeError::Channel(e.to_string())),
    };
    check_hello(&local, &peer)?;
    Ok(Connection {
        tx: to_server,
        rx: from_server,
        peer,
    })
}
