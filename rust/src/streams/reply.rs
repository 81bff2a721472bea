//! Stream replies (`XREADGROUP`, `XAUTOCLAIM`, `XRANGE`) into entries.
//!
//! Works on `redis-protocol`'s `BytesFrame`: every field is a view into the
//! read buffer, so an entry costs one `Vec` and no copies.

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

use crate::envelope::RawEntry;

fn bulk(frame: BytesFrame) -> Option<Bytes> {
    match frame {
        BytesFrame::BulkString(bytes) | BytesFrame::SimpleString(bytes) => Some(bytes),
        _ => None,
    }
}

/// The bytes of a string reply, borrowed.
#[must_use]
pub fn text(frame: &BytesFrame) -> Option<&Bytes> {
    match frame {
        BytesFrame::BulkString(bytes) | BytesFrame::SimpleString(bytes) => Some(bytes),
        _ => None,
    }
}

/// The value of an integer reply.
#[must_use]
pub fn integer(frame: &BytesFrame) -> Option<i64> {
    match frame {
        BytesFrame::Integer(value) => Some(*value),
        _ => None,
    }
}

/// Parses one `[id, [field, value, ...]]` entry. An entry whose fields are
/// nil (deleted while pending) yields an entry with no fields.
#[must_use]
pub fn entry(frame: BytesFrame) -> Option<RawEntry> {
    let BytesFrame::Array(parts) = frame else {
        return None;
    };
    let mut parts = parts.into_iter();
    let entry_id = bulk(parts.next()?)?;
    let mut fields = Vec::new();
    if let Some(BytesFrame::Array(flat)) = parts.next() {
        fields.reserve(flat.len() / 2);
        let mut flat = flat.into_iter();
        while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
            if let (Some(name), Some(value)) = (bulk(name), bulk(value)) {
                fields.push((name, value));
            }
        }
    }
    Some(RawEntry { entry_id, fields })
}

/// Parses an array of entries (`XRANGE`, or the middle of `XAUTOCLAIM`).
#[must_use]
pub fn entries(frame: BytesFrame) -> Vec<RawEntry> {
    match frame {
        BytesFrame::Array(items) => items.into_iter().filter_map(entry).collect(),
        _ => Vec::new(),
    }
}

/// Parses an `XREADGROUP` reply into `(stream key, entry)` pairs; a timed-out
/// blocking read (nil) is empty.
#[must_use]
pub fn read_reply(frame: BytesFrame) -> Vec<(Bytes, RawEntry)> {
    let BytesFrame::Array(streams) = frame else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for stream in streams {
        let BytesFrame::Array(pair) = stream else {
            continue;
        };
        let mut pair = pair.into_iter();
        let (Some(key), Some(items)) = (pair.next().and_then(bulk), pair.next()) else {
            continue;
        };
        for item in entries(items) {
            out.push((key.clone(), item));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use redis_protocol::resp2::decode::decode_bytes_mut;

    fn decode(wire: &str) -> BytesFrame {
        let mut buffer = BytesMut::from(wire.as_bytes());
        decode_bytes_mut(&mut buffer)
            .ok()
            .flatten()
            .map(|(frame, _, _)| frame)
            .expect("a whole frame")
    }

    #[test]
    fn xreadgroup_reply_becomes_entries() {
        let wire = "*1\r\n*2\r\n$17\r\nflumeq:{q}:stream\r\n*2\r\n\
                    *2\r\n$3\r\n1-0\r\n*4\r\n$2\r\nid\r\n$1\r\na\r\n$4\r\ntype\r\n$1\r\nt\r\n\
                    *2\r\n$3\r\n2-0\r\n*-1\r\n";
        let parsed = read_reply(decode(wire));
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, Bytes::from_static(b"flumeq:{q}:stream"));
        assert_eq!(parsed[0].1.id_text(), "1-0");
        assert_eq!(parsed[0].1.get("type"), Some(&b"t"[..]));
        assert!(parsed[1].1.fields.is_empty());
    }

    #[test]
    fn timed_out_read_is_empty() {
        assert!(read_reply(decode("*-1\r\n")).is_empty());
    }
}
