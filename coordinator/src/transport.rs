//! How the coordinator reaches a node.
//!
//! [`Transport`] is what the issuance flow needs from a node; [`GrpcAgent`]
//! implements it over the agent's gRPC service. [`agent_channel`] is the one
//! place the coordinator→agent channel is built, so making it mutual TLS
//! (and adding an SSH fallback beside it) changes this file only.

use std::net::SocketAddr;
use std::time::Duration;

use certfleet_proto::MAX_MESSAGE_BYTES;
use certfleet_proto::challenge::{Http01Response, Token};
use certfleet_proto::pb;
use certfleet_proto::pb::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};

use crate::config::Node;

/// How long to wait for a TCP connection to an agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a call to a node failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl From<tonic::Status> for TransportError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::Unavailable => Self::Unreachable(status.message().to_owned()),
            code => Self::Refused {
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

/// What the issuance flow asks of a node.
#[tonic::async_trait]
pub trait Transport: Send + Sync {
    /// Serves every response in `batch` for `ttl`, in one call.
    async fn place_tokens(
        &self,
        batch: &[Http01Response],
        ttl: Duration,
    ) -> Result<(), TransportError>;
    /// Stops serving `tokens`; returns how many were being served.
    async fn remove_tokens(&self, tokens: &[Token]) -> Result<u32, TransportError>;
}

/// Builds the channel to one agent. Lazy: nothing connects until the first
/// call, so a node that is down delays nobody until it is needed.
pub fn agent_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI authority")
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy()
}

/// A node reached through its agent's gRPC service.
#[derive(Clone)]
pub struct GrpcAgent {
    client: AgentClient<Channel>,
}

impl GrpcAgent {
    pub fn new(node: &Node) -> Self {
        let client = AgentClient::new(agent_channel(node.agent))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Self { client }
    }
}

#[tonic::async_trait]
impl Transport for GrpcAgent {
    async fn place_tokens(
        &self,
        batch: &[Http01Response],
        ttl: Duration,
    ) -> Result<(), TransportError> {
        let request = pb::PlaceTokensRequest {
            tokens: batch.iter().map(pb::Http01Token::from).collect(),
            ttl_seconds: ttl.as_secs().try_into().unwrap_or(u32::MAX),
        };
        self.client.clone().place_tokens(request).await?;
        Ok(())
    }

    async fn remove_tokens(&self, tokens: &[Token]) -> Result<u32, TransportError> {
        let request = pb::RemoveTokensRequest {
            tokens: tokens.iter().map(Token::to_string).collect(),
        };
        Ok(self
            .client
            .clone()
            .remove_tokens(request)
            .await?
            .into_inner()
            .removed)
    }
}
