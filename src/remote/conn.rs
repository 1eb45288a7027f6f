//! Connections to the engine. Two kinds, because the client's default 500 ms response
//! timeout breaks blocking reads and because a blocking read holds up every later reply on
//! its socket: a [`ConnectionManager`] (reconnects by itself) for short commands, and a
//! dedicated connection per blocking reader, without a response timeout, that the reader
//! rebuilds itself when it breaks.

use crate::error::CreateError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client};
use std::time::Duration;

/// Longest a short command may take before it is an engine error.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for `url`: `redis://`, `redis+unix://`, or `rediss://` (TLS, the server's
/// certificate checked against the system's roots, or those in `SSL_CERT_FILE`).
pub(crate) fn client(url: &str) -> Result<Client, CreateError> {
    install_tls_provider();
    Client::open(url).map_err(|e| CreateError::Engine {
        message: format!("bad engine URL {url:?}: {e}"),
    })
}

/// rustls needs a process-wide crypto provider, and finds none by itself when the
/// application's dependencies build two (aws-lc-rs beside our ring): a `rediss://`
/// connection would then panic. Installs ring, unless the application installed one.
fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The connection for short commands, checked with a PING.
pub(crate) async fn manager(
    client: &Client,
    connect_timeout: Duration,
) -> Result<ConnectionManager, CreateError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    let attempt = async {
        let mut manager = client.get_connection_manager_with_config(config).await?;
        redis::cmd("PING")
            .query_async::<String>(&mut manager)
            .await?;
        Ok::<_, redis::RedisError>(manager)
    };
    match tokio::time::timeout(connect_timeout + COMMAND_TIMEOUT, attempt).await {
        Ok(Ok(manager)) => Ok(manager),
        Ok(Err(e)) => Err(CreateError::Engine {
            message: format!("cannot reach the engine: {e}"),
        }),
        Err(_) => Err(CreateError::Engine {
            message: format!("cannot reach the engine within {connect_timeout:?}"),
        }),
    }
}

/// A connection of its own for one blocking reader.
pub(crate) async fn blocking(
    client: &Client,
    connect_timeout: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    dedicated(client, connect_timeout, None).await
}

/// A connection of its own (not shared, not re-opened behind the caller's back: what the
/// engine's list of clients shows of it is this process's).
pub(crate) async fn dedicated(
    client: &Client,
    connect_timeout: Duration,
    response_timeout: Option<Duration>,
) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(response_timeout);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Creates the calls stream and its group if they do not exist.
pub(crate) async fn ensure_group(
    conn: &mut ConnectionManager,
    calls: &str,
) -> redis::RedisResult<()> {
    let created = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(calls)
        .arg(super::keys::GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .exec_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Whether `e` says the stream or its group is gone (a restarted engine without
/// persistence): re-create the group.
pub(crate) fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

/// Back-off between reconnect attempts: 100 ms doubling to 5 s.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }

    pub(crate) fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

/// The server's run id: it changes when the server restarts.
pub(crate) async fn run_id(conn: &mut impl redis::aio::ConnectionLike) -> Option<String> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
}
