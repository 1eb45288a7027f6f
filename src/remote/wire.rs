//! What travels through the engine: a call entry in the calls stream, a result entry in a
//! caller's results stream, and the mapping of errors to and from their wire form.
//!
//! Each entry has two fields: `h`, a short text header, and `b`, the payload as the caller's
//! serializer (or the worker's) encoded it. Two fields, not one per attribute: every field is
//! a value the engine stores and each client allocates and parses, per call.

use crate::error::CallError;
use redis::streams::StreamId;
use redis::Value;
use std::time::Duration;

/// Version of the entries below: a call's header starts with it, and a node answers calls
/// of another version with an error.
pub(crate) const WIRE_VERSION: &str = "2";

/// An entry of one of the farm's streams, as read: its id and its two fields (empty when
/// absent: the entry is then malformed, and reported by whoever reads it).
#[derive(Debug, Clone, Default)]
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) head: Vec<u8>,
    pub(crate) body: Vec<u8>,
}

impl Entry {
    /// From an entry the client parsed into a map (the rarer reads: claims, ranges).
    pub(crate) fn from_stream_id(entry: &StreamId) -> Entry {
        let field = |name: &str| match entry.map.get(name) {
            Some(Value::BulkString(b)) => b.clone(),
            Some(Value::SimpleString(s)) => s.clone().into_bytes(),
            _ => Vec::new(),
        };
        Entry {
            id: entry.id.clone(),
            head: field("h"),
            body: field("b"),
        }
    }

    fn from_value(entry: Value) -> Option<Entry> {
        let mut parts = into_items(entry)?.into_iter();
        let id = into_text(parts.next()?)?;
        let mut out = Entry {
            id,
            ..Entry::default()
        };
        // A deleted entry still pending has no fields (nil).
        let Some(fields) = parts.next().and_then(into_items) else {
            return Some(out);
        };
        let mut fields = fields.into_iter();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            match (into_bytes(name).as_deref(), into_bytes(value)) {
                (Some(b"h"), Some(v)) => out.head = v,
                (Some(b"b"), Some(v)) => out.body = v,
                _ => {}
            }
        }
        Some(out)
    }
}

/// The entries of an `XREAD` or `XREADGROUP` reply, in order, taken out of the reply
/// without copying (the client's typed stream replies build a map per entry).
pub(crate) fn read_reply(reply: Value) -> Vec<Entry> {
    let streams = match reply {
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        other => into_items(other)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|stream| into_items(stream)?.into_iter().nth(1))
            .collect::<Vec<_>>(),
    };
    streams
        .into_iter()
        .filter_map(into_items)
        .flatten()
        .filter_map(Entry::from_value)
        .collect()
}

fn into_items(value: Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

fn into_bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn into_text(value: Value) -> Option<String> {
    String::from_utf8(into_bytes(value)?).ok()
}

/// The header of an inbox entry asking a node to stop running calls-stream entry `entry`
/// (its caller cancelled it).
pub(crate) fn cancel_head(entry: &str) -> String {
    format!("cancel {entry}")
}

/// The entry a cancel names, if `head` is one.
pub(crate) fn parse_cancel(head: &[u8]) -> Option<&str> {
    std::str::from_utf8(head.strip_prefix(b"cancel ")?).ok()
}

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

/// A call's header: `version id client fmt maxd deadline timeout method` (`-` for a
/// deadline or timeout not set; the method last, as it may hold spaces).
pub(crate) fn call_head(
    id: u64,
    client: &str,
    fmt: &str,
    maxd: u32,
    deadline: Option<u64>,
    timeout: Option<Duration>,
    method: &str,
) -> String {
    let or_dash = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    format!(
        "{WIRE_VERSION} {id} {client} {fmt} {maxd} {} {} {method}",
        or_dash(deadline),
        or_dash(timeout.map(|t| t.as_millis().max(1) as u64)),
    )
}

impl CallEntry {
    /// Parses a calls-stream entry; `Err` with the client and id when they could be read
    /// (so the node can answer) and what was wrong.
    pub(crate) fn parse(entry: Entry) -> Result<Self, (Option<(String, u64)>, String)> {
        let Ok(head) = std::str::from_utf8(&entry.head) else {
            return Err((None, "a call entry whose header is not text".to_owned()));
        };
        let parts: Vec<&str> = head.splitn(8, ' ').collect();
        let [version, id, client, fmt, maxd, deadline, timeout, method] = parts[..] else {
            let message = if head.is_empty() {
                "a call entry without its header field `h`".to_owned()
            } else {
                format!("a call entry with a malformed header {head:?}")
            };
            return Err((None, message));
        };
        let who = id.parse().ok().map(|id| (client.to_owned(), id));
        let bad = |what: &str| (who.clone(), format!("a call entry with a malformed {what}"));
        let optional = |s: &str, what: &str| match s {
            "-" => Ok(None),
            n => n.parse().map(Some).map_err(|_| bad(what)),
        };
        Ok(CallEntry {
            id: id.parse().map_err(|_| bad("id"))?,
            client: client.to_owned(),
            method: method.to_owned(),
            fmt: fmt.to_owned(),
            maxd: maxd.parse().map_err(|_| bad("delivery budget"))?,
            deadline: optional(deadline, "deadline")?,
            timeout: optional(timeout, "timeout")?.map(Duration::from_millis),
            version: version.to_owned(),
            entry: entry.id,
            body: entry.body,
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
    /// Where on its node the call ran (for a result).
    pub(crate) ran: Option<RanOn>,
}

/// Where on its node a call ran, and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RanOn {
    pub(crate) slot: usize,
    pub(crate) pid: u32,
    /// Attempts on that node (more than 1 when a local worker died under it).
    pub(crate) attempts: u32,
    pub(crate) ran_for: Duration,
}

/// How a result's body reads.
pub(crate) enum Answered<'a> {
    /// The body is the result, of a call that ran there.
    Ok(Option<RanOn>),
    /// The body is the message of a failure of this kind.
    Err(&'a str),
    /// The body is a node's broadcast answer.
    Broadcast,
}

/// A result's header: `id node deliveries 1 [slot pid attempts ran_us]` (the body is the
/// result), `id node deliveries 0 kind` (the body is the failure's message), or `id node
/// deliveries b`.
pub(crate) fn result_head(id: u64, node: &str, deliveries: u32, answered: Answered<'_>) -> String {
    match answered {
        Answered::Ok(Some(ran)) => format!(
            "{id} {node} {deliveries} 1 {} {} {} {}",
            ran.slot,
            ran.pid,
            ran.attempts,
            ran.ran_for.as_micros()
        ),
        Answered::Ok(None) => format!("{id} {node} {deliveries} 1"),
        Answered::Err(kind) => format!("{id} {node} {deliveries} 0 {kind}"),
        Answered::Broadcast => format!("{id} {node} {deliveries} b"),
    }
}

impl ResultEntry {
    pub(crate) fn parse(entry: Entry) -> Option<Self> {
        let head = std::str::from_utf8(&entry.head).ok()?;
        let mut parts = head.split(' ');
        let id = parts.next()?.parse().ok()?;
        let node = parts.next()?.to_owned();
        let deliveries = parts.next()?.parse().ok()?;
        let mut ran = None;
        let (outcome, broadcast) = match parts.next()? {
            "1" => {
                let mut number = || parts.next()?.parse::<u64>().ok();
                if let (Some(slot), Some(pid), Some(attempts), Some(us)) =
                    (number(), number(), number(), number())
                {
                    ran = Some(RanOn {
                        slot: usize::try_from(slot).ok()?,
                        pid: u32::try_from(pid).ok()?,
                        attempts: u32::try_from(attempts).ok()?,
                        ran_for: Duration::from_micros(us),
                    });
                }
                (Ok(entry.body), None)
            }
            "b" => (Ok(Vec::new()), Some(entry.body)),
            "0" => {
                let kind = parts.next()?.to_owned();
                (
                    Err((kind, String::from_utf8_lossy(&entry.body).into_owned())),
                    None,
                )
            }
            _ => return None,
        };
        Some(ResultEntry {
            id,
            outcome,
            broadcast,
            node,
            deliveries,
            ran,
        })
    }
}

/// What a node's liveness key holds: its worker count (what a broadcast reaches there)
/// and, when the server would say, its [`Presence`]: `"<workers>"` or `"<workers> <client
/// id> <run id>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Beat {
    pub(crate) workers: usize,
    pub(crate) presence: Option<Presence>,
}

/// A node's heartbeat connection as the server knows it: its client id, under the server
/// run (`INFO`'s `run_id`) that gave it. Ids start again in a new run, so an id is only
/// judged under its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Presence {
    pub(crate) client: u64,
    pub(crate) run: String,
}

impl Beat {
    pub(crate) fn parse(s: &str) -> Option<Beat> {
        let mut parts = s.split(' ');
        let workers = parts.next()?.parse().ok()?;
        let presence = match (parts.next(), parts.next()) {
            (Some(client), Some(run)) => Some(Presence {
                client: client.parse().ok()?,
                run: run.to_owned(),
            }),
            (None, None) => None,
            _ => return None,
        };
        Some(Beat { workers, presence })
    }
}

impl std::fmt::Display for Beat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.presence {
            Some(p) => write!(f, "{} {} {}", self.workers, p.client, p.run),
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
        CallError::RetriesExhausted {
            attempts,
            last,
            earlier,
        } => {
            // The nodes of earlier attempts lost with their node (the rest are local).
            let nodes: Vec<&str> = earlier
                .iter()
                .filter_map(|e| match e {
                    CallError::NodeLost { node, .. } if !node.is_empty() => Some(node.as_str()),
                    _ => None,
                })
                .collect();
            let nodes = if nodes.is_empty() {
                "-".to_owned()
            } else {
                nodes.join(",")
            };
            let (kind, message) = encode_error(last);
            (
                "retries_exhausted",
                format!("{attempts} {nodes} {kind} {message}"),
            )
        }
        CallError::NodeLost { node, message } => ("node_lost", format!("{node} {message}")),
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
            let mut parts = message.splitn(4, ' ');
            let attempts = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let earlier = match parts.next() {
                Some("-") | None => Vec::new(),
                Some(nodes) => nodes
                    .split(',')
                    .map(|n| CallError::NodeLost {
                        node: n.to_owned(),
                        message: "the node died or lost its lease while it ran the call".to_owned(),
                    })
                    .collect(),
            };
            let last_kind = parts.next().unwrap_or("lost").to_owned();
            let last_message = parts.next().unwrap_or_default().to_owned();
            CallError::RetriesExhausted {
                attempts,
                last: Box::new(decode_error(&last_kind, last_message, &method, node)),
                earlier,
            }
        }
        "node_lost" => {
            let (lost, message) = message.split_once(' ').unwrap_or((&message, ""));
            CallError::NodeLost {
                node: lost.to_owned(),
                message: message.to_owned(),
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
    fn a_beat_round_trips_with_and_without_its_connection() {
        let presence = Presence {
            client: 17,
            run: "ab12".into(),
        };
        for beat in [
            Beat {
                workers: 4,
                presence: Some(presence),
            },
            Beat {
                workers: 2,
                presence: None,
            },
        ] {
            assert_eq!(Beat::parse(&beat.to_string()), Some(beat));
        }
        assert_eq!(Beat::parse("x"), None);
        assert_eq!(Beat::parse("2 x r"), None);
        assert_eq!(Beat::parse("2 17"), None);
    }

    #[test]
    fn calls_and_results_survive_the_wire() {
        let head = call_head(
            7,
            "c-1",
            "json",
            4,
            None,
            Some(Duration::from_secs(2)),
            "a method",
        );
        let entry = Entry {
            id: "1-0".into(),
            head: head.into_bytes(),
            body: b"[1]".to_vec(),
        };
        let call = CallEntry::parse(entry).unwrap();
        assert_eq!(
            (
                call.id,
                call.client.as_str(),
                call.method.as_str(),
                call.maxd
            ),
            (7, "c-1", "a method", 4)
        );
        assert_eq!(
            (call.deadline, call.timeout),
            (None, Some(Duration::from_secs(2)))
        );
        assert_eq!(call.version, WIRE_VERSION);
        let malformed = Entry {
            id: "1-1".into(),
            head: b"2 8 c-1 json x - - m".to_vec(),
            body: Vec::new(),
        };
        let (who, message) = CallEntry::parse(malformed).unwrap_err();
        assert_eq!(who, Some(("c-1".to_owned(), 8)), "{message}");
        assert!(CallEntry::parse(Entry::default()).is_err());

        let entry = Entry {
            id: "2-0".into(),
            head: result_head(7, "n-1", 2, Answered::Err("handler")).into_bytes(),
            body: b"no luck".to_vec(),
        };
        let result = ResultEntry::parse(entry).unwrap();
        assert_eq!(
            (result.id, result.node.as_str(), result.deliveries),
            (7, "n-1", 2)
        );
        assert_eq!(
            result.outcome,
            Err(("handler".to_owned(), "no luck".to_owned()))
        );
    }

    #[test]
    fn a_result_says_where_it_ran() {
        let ran = RanOn {
            slot: 1,
            pid: 42,
            attempts: 2,
            ran_for: Duration::from_micros(1500),
        };
        let entry = Entry {
            id: "3-0".into(),
            head: result_head(8, "n-2", 1, Answered::Ok(Some(ran))).into_bytes(),
            body: b"5".to_vec(),
        };
        let result = ResultEntry::parse(entry).unwrap();
        assert_eq!((result.ran, result.outcome), (Some(ran), Ok(b"5".to_vec())));
    }

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
            CallError::RetriesExhausted {
                attempts: 3,
                last: Box::new(CallError::NodeLost {
                    node: "n3".into(),
                    message: "gone with it".into(),
                }),
                earlier: ["n1", "n2"]
                    .map(|node| CallError::NodeLost {
                        node: node.into(),
                        message: "the node died or lost its lease while it ran the call".into(),
                    })
                    .to_vec(),
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
