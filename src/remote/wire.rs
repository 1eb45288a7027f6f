//! What travels through the engine: a call entry in the calls stream, a result entry in a
//! caller's results stream, and the mapping of errors to and from their wire form.

use crate::error::CallError;
use redis::streams::StreamId;
use redis::Value;
use std::time::Duration;

/// Version of the entries below; a node answers entries of another version with an error.
pub(crate) const WIRE_VERSION: &str = "1";

/// A call as a node reads it.
#[derive(Debug)]
pub(crate) struct CallEntry {
    /// The stream entry id (to ack and delete).
    pub(crate) entry: String,
    pub(crate) id: u64,
    pub(crate) client: String,
    pub(crate) method: String,
    pub(crate) fmt: String,
    pub(crate) body: Vec<u8>,
    /// Deliveries allowed: the caller's `max_retries + 1`.
    pub(crate) maxd: u32,
    /// Unix ms after which the call must not start.
    pub(crate) deadline: Option<u64>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) version: String,
}

fn bytes(entry: &StreamId, field: &str) -> Option<Vec<u8>> {
    match entry.map.get(field)? {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

fn text(entry: &StreamId, field: &str) -> Option<String> {
    bytes(entry, field).and_then(|b| String::from_utf8(b).ok())
}

fn number(entry: &StreamId, field: &str) -> Option<u64> {
    text(entry, field)?.parse().ok()
}

impl CallEntry {
    /// Parses a calls-stream entry; `Err` with the client and id when they could be read
    /// (so the node can answer) and what was wrong.
    pub(crate) fn parse(entry: &StreamId) -> Result<Self, (Option<(String, u64)>, String)> {
        let who = text(entry, "client").zip(number(entry, "id"));
        let missing = |field: &str| (who.clone(), format!("call entry without `{field}`"));
        Ok(CallEntry {
            entry: entry.id.clone(),
            id: number(entry, "id").ok_or_else(|| missing("id"))?,
            client: text(entry, "client").ok_or_else(|| missing("client"))?,
            method: text(entry, "method").ok_or_else(|| missing("method"))?,
            fmt: text(entry, "fmt").ok_or_else(|| missing("fmt"))?,
            body: bytes(entry, "body").ok_or_else(|| missing("body"))?,
            maxd: number(entry, "maxd")
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| missing("maxd"))?,
            deadline: number(entry, "deadline"),
            timeout: number(entry, "timeout").map(Duration::from_millis),
            version: text(entry, "v").unwrap_or_default(),
        })
    }
}

/// A result as a caller reads it.
#[derive(Debug)]
pub(crate) struct ResultEntry {
    pub(crate) id: u64,
    pub(crate) outcome: Result<Vec<u8>, (String, String)>,
    /// A broadcast's answer from one node: each of its workers' outcomes (see
    /// [`encode_broadcast`]); `outcome` is then empty.
    pub(crate) broadcast: Option<Vec<u8>>,
    pub(crate) node: String,
    pub(crate) deliveries: u32,
}

impl ResultEntry {
    pub(crate) fn parse(entry: &StreamId) -> Option<Self> {
        let ok = text(entry, "ok")?;
        let broadcast = if ok == "b" {
            Some(bytes(entry, "body")?)
        } else {
            None
        };
        let outcome = if ok == "1" || ok == "b" {
            Ok(if ok == "1" {
                bytes(entry, "body")?
            } else {
                Vec::new()
            })
        } else {
            Err((text(entry, "kind")?, text(entry, "msg").unwrap_or_default()))
        };
        Some(ResultEntry {
            broadcast,
            id: number(entry, "id")?,
            outcome,
            node: text(entry, "node").unwrap_or_default(),
            deliveries: number(entry, "deliveries")
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
        })
    }
}

/// What a node's liveness key holds: its worker count (what a broadcast reaches there) and
/// the engine's id of its heartbeat connection (absent when the engine would not say),
/// as `"<workers> <client id>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Beat {
    pub(crate) workers: usize,
    pub(crate) client: Option<u64>,
}

impl Beat {
    pub(crate) fn parse(s: &str) -> Option<Beat> {
        let mut parts = s.split(' ');
        let workers = parts.next()?.parse().ok()?;
        let client = match parts.next() {
            Some(c) => Some(c.parse().ok()?),
            None => None,
        };
        Some(Beat { workers, client })
    }
}

impl std::fmt::Display for Beat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.client {
            Some(client) => write!(f, "{} {client}", self.workers),
            None => write!(f, "{}", self.workers),
        }
    }
}

/// A failure's wire form: `(kind, message)`.
pub(crate) fn encode_error(error: &CallError) -> (&'static str, String) {
    match error {
        CallError::Handler { message, .. } => ("handler", message.clone()),
        CallError::Panic { message, .. } => ("panic", message.clone()),
        CallError::UnknownMethod { .. } => ("unknown_method", String::new()),
        CallError::BadArguments { message, .. } => ("bad_arguments", message.clone()),
        CallError::Timeout { after } => ("timeout", after.as_millis().to_string()),
        CallError::Deadline { ran } => ("deadline", u8::from(*ran).to_string()),
        CallError::Cancelled => ("cancelled", String::new()),
        CallError::Refused { .. } => ("refused", error.to_string()),
        CallError::RetriesExhausted { attempts, last, .. } => {
            let (kind, message) = encode_error(last);
            ("retries_exhausted", format!("{attempts} {kind} {message}"))
        }
        CallError::WorkerStart { message } => ("unavailable", message.clone()),
        other => ("lost", other.to_string()),
    }
}

/// A failure from its wire form, for a call of `method` answered by `node`.
pub(crate) fn decode_error(kind: &str, message: String, method: &str, node: &str) -> CallError {
    let method = method.to_owned();
    match kind {
        "handler" => CallError::Handler { method, message },
        "panic" => CallError::Panic { method, message },
        "unknown_method" => CallError::UnknownMethod { method },
        "bad_arguments" => CallError::BadArguments { method, message },
        "timeout" => CallError::Timeout {
            after: Duration::from_millis(message.parse().unwrap_or(0)),
        },
        "deadline" => CallError::Deadline {
            ran: message == "1",
        },
        "cancelled" => CallError::Cancelled,
        "unavailable" => CallError::WorkerStart { message },
        "retries_exhausted" => {
            let mut parts = message.splitn(3, ' ');
            let attempts = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let last_kind = parts.next().unwrap_or("lost").to_owned();
            let last_message = parts.next().unwrap_or_default().to_owned();
            CallError::RetriesExhausted {
                attempts,
                last: Box::new(decode_error(&last_kind, last_message, &method, node)),
                earlier: Vec::new(),
            }
        }
        _ => CallError::NodeLost {
            node: node.to_owned(),
            message,
        },
    }
}

/// One node's broadcast answer: for each of its workers (by slot), its result or failure.
/// Layout: per worker `slot: u32`, `ok: u8`, then `body` (ok) or `kind` and `msg`, each as
/// `len: u32` + bytes; all little-endian.
pub(crate) fn encode_broadcast(outcomes: &[(usize, Result<Vec<u8>, CallError>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let put = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(b);
    };
    for (slot, outcome) in outcomes {
        out.extend_from_slice(&u32::try_from(*slot).unwrap_or(u32::MAX).to_le_bytes());
        match outcome {
            Ok(body) => {
                out.push(1);
                put(&mut out, body);
            }
            Err(error) => {
                out.push(0);
                let (kind, message) = encode_error(error);
                put(&mut out, kind.as_bytes());
                put(&mut out, message.as_bytes());
            }
        }
    }
    out
}

/// The outcomes in a node's broadcast answer, by slot; `None` if it is malformed.
pub(crate) type WorkerOutcome = Result<Vec<u8>, (String, String)>;

pub(crate) fn decode_broadcast(mut b: &[u8]) -> Option<Vec<(usize, WorkerOutcome)>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }
    fn u32_of(b: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?))
    }
    fn chunk(b: &mut &[u8]) -> Option<Vec<u8>> {
        let len = u32_of(b)? as usize;
        take(b, len).map(<[u8]>::to_vec)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let slot = u32_of(&mut b)? as usize;
        let (&ok, rest) = b.split_first()?;
        b = rest;
        let outcome = if ok == 1 {
            Ok(chunk(&mut b)?)
        } else {
            let kind = String::from_utf8(chunk(&mut b)?).ok()?;
            let message = String::from_utf8(chunk(&mut b)?).ok()?;
            Err((kind, message))
        };
        out.push((slot, outcome));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn broadcast_answers_survive_the_wire() {
        let outcomes = vec![
            (0, Ok(b"one".to_vec())),
            (1, Err(CallError::Cancelled)),
            (2, Ok(Vec::new())),
        ];
        let decoded = decode_broadcast(&encode_broadcast(&outcomes)).unwrap();
        assert_eq!(decoded.len(), 3);
        assert_eq!(decoded[0], (0, Ok(b"one".to_vec())));
        assert_eq!(decoded[1], (1, Err(("cancelled".into(), String::new()))));
        assert!(decode_broadcast(&[1, 0]).is_none(), "truncated");
    }

    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        let cases = [
            CallError::Handler {
                method: "m".into(),
                message: "no".into(),
            },
            CallError::Timeout {
                after: Duration::from_millis(250),
            },
            CallError::Deadline { ran: true },
            CallError::RetriesExhausted {
                attempts: 3,
                last: Box::new(CallError::Panic {
                    method: "m".into(),
                    message: "boom with spaces".into(),
                }),
                earlier: Vec::new(),
            },
        ];
        for error in cases {
            let (kind, message) = encode_error(&error);
            assert_eq!(decode_error(kind, message, "m", "n"), error);
        }
        let lost = decode_error("lost", "worker died".into(), "m", "n1");
        assert!(matches!(lost, CallError::NodeLost { node, .. } if node == "n1"));
    }
}
