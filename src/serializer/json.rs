use super::{SerializeError, Serializer};
use serde::{de::DeserializeOwned, Serialize};

/// JSON through `serde_json`: the default, readable, and the fastest built-in for small
/// values. Cannot carry NaN or infinities (they encode as `null`) and turns byte strings
/// into arrays of numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json;

impl Serializer for Json {
    fn name(&self) -> &str {
        "json"
    }

    fn encode<T: Serialize + ?Sized>(
        &self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), SerializeError> {
        serde_json::to_writer(out, value).map_err(SerializeError::new)
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        serde_json::from_slice(bytes).map_err(SerializeError::new)
    }
}
