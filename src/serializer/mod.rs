//! How arguments and results become bytes.
//!
//! A farm encodes each call's arguments with its [`Serializer`] and the worker decodes them
//! with the serializer named in the handshake; results travel back the same way. JSON
//! ([`Json`], the default), CBOR ([`Cbor`]) and Postcard ([`Postcard`]) are built in. CBOR
//! carries what JSON cannot: NaN, ±infinity, `-0.0`, byte strings and maps with non-string
//! keys. Postcard carries the same, and is the fastest for numbers and bulk data, but is not
//! self-describing.
//!
//! The trait has generic methods, so it is not object-safe: the parent side picks one at
//! compile time (`Farm<S>`), and the worker side uses [`Builtin`], which dispatches to JSON or
//! CBOR at run time, or a user's own type that answers to its own name.
//!
//! # Examples
//!
//! ```
//! use workfarm::serializer::{Cbor, Serializer};
//!
//! let mut bytes = Vec::new();
//! Cbor.encode(&f64::NAN, &mut bytes).unwrap();
//! let back: f64 = Cbor.decode(&bytes).unwrap();
//! assert!(back.is_nan());
//! ```

mod cbor;
mod json;
mod postcard;

pub use self::postcard::Postcard;
pub use cbor::Cbor;
pub use json::Json;

use serde::{de::DeserializeOwned, Serialize};
use std::fmt;

/// Turns values into bytes and back.
pub trait Serializer: Clone + Send + Sync + 'static {
    /// The name sent in the handshake, so the worker decodes with the same format.
    fn name(&self) -> &str;

    /// Appends the encoding of `value` to `out`.
    ///
    /// # Errors
    ///
    /// When the value cannot be represented in this format.
    fn encode<T: Serialize + ?Sized>(
        &self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), SerializeError>;

    /// Decodes one value from the whole of `bytes`.
    ///
    /// # Errors
    ///
    /// When the bytes are not a valid encoding of a `T`.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, SerializeError>;

    /// The serializer to use when the farm asks for `name`, or `None` if this one cannot
    /// speak it. Workers call this during the handshake.
    fn select(&self, name: &str) -> Option<Self> {
        (name == self.name()).then(|| self.clone())
    }
}

/// A value that would not encode or decode. Display gives the format's own message.
#[derive(Debug, Clone)]
pub struct SerializeError {
    message: String,
}

impl SerializeError {
    /// Wraps a format's error message.
    pub fn new(message: impl fmt::Display) -> Self {
        SerializeError {
            message: message.to_string(),
        }
    }

    /// The format's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for SerializeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SerializeError {}

/// Any built-in serializer, chosen at run time: what workers use by default, so one worker
/// binary serves farms of every built-in format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Builtin {
    /// [`Json`].
    #[default]
    Json,
    /// [`Cbor`].
    Cbor,
    /// [`Postcard`].
    Postcard,
}

impl Serializer for Builtin {
    fn name(&self) -> &str {
        match self {
            Builtin::Json => Json.name(),
            Builtin::Cbor => Cbor.name(),
            Builtin::Postcard => Postcard.name(),
        }
    }

    fn encode<T: Serialize + ?Sized>(
        &self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), SerializeError> {
        match self {
            Builtin::Json => Json.encode(value, out),
            Builtin::Cbor => Cbor.encode(value, out),
            Builtin::Postcard => Postcard.encode(value, out),
        }
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        match self {
            Builtin::Json => Json.decode(bytes),
            Builtin::Cbor => Cbor.decode(bytes),
            Builtin::Postcard => Postcard.decode(bytes),
        }
    }

    fn select(&self, name: &str) -> Option<Self> {
        match name {
            "json" => Some(Builtin::Json),
            "cbor" => Some(Builtin::Cbor),
            "postcard" => Some(Builtin::Postcard),
            _ => None,
        }
    }
}
