//! Redis Cluster's routing: which slot a command's key hashes to, which
//! master serves each slot (from `CLUSTER SLOTS`), and the redirections a
//! node answers with when the map is out of date (`MOVED`, `ASK`).
//!
//! redis-rs routes the client's and the writers' commands itself; this map
//! serves the zero-copy read connections, and the splitting of pipelines
//! whose commands sit on several slots (redis-rs refuses those).

use redis::{Cmd, Pipeline};
use redis_protocol::resp2::types::BytesFrame;

/// Redis Cluster's number of hash slots.
pub const SLOTS: u16 = 16384;

/// The part of `key` that is hashed: its `{tag}` when it has a non-empty
/// one, the whole key otherwise (Redis Cluster's rule).
fn hashed(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|byte| *byte == b'{') {
        if let Some(length) = key[open + 1..].iter().position(|byte| *byte == b'}') {
            if length > 0 {
                return &key[open + 1..open + 1 + length];
            }
        }
    }
    key
}

/// The hash slot of `key`.
#[must_use]
pub fn key_slot(key: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hashed(key)) % SLOTS
}

/// The key a command is routed by (its first key), `None` for a command
/// with no key (`PING`, `CLIENT`, `SCRIPT`, an `EVALSHA` of no keys ...).
/// Allocates nothing: it runs for every command a cluster query sends,
/// one per idempotent task in a read's done-marker checks.
#[must_use]
pub fn command_key(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().filter_map(|arg| match arg {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let first = args.next()?;
    let mut name = [0u8; 16];
    let length = first.len().min(name.len());
    name[..length].copy_from_slice(&first[..length]);
    name.make_ascii_uppercase();
    // The key's place among the arguments after the command's name.
    let at = match &name[..length] {
        b"XREAD" | b"XREADGROUP" => {
            args.position(|arg| arg.eq_ignore_ascii_case(b"STREAMS"))?;
            0
        }
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let keys: usize = std::str::from_utf8(args.nth(1)?).ok()?.parse().ok()?;
            if keys == 0 {
                return None;
            }
            0
        }
        b"XGROUP" | b"XINFO" | b"OBJECT" | b"MEMORY" => 1,
        b"PING" | b"CLIENT" | b"SCRIPT" | b"INFO" | b"CLUSTER" | b"TIME" | b"ASKING" | b"MULTI"
        | b"EXEC" | b"DBSIZE" | b"CONFIG" | b"ROLE" | b"FUNCTION" | b"AUTH" | b"HELLO"
        | b"SELECT" | b"ACL" | b"SCAN" | b"COMMAND" => return None,
        _ => 0,
    };
    args.nth(at)
}

/// The slot a command is routed by.
#[must_use]
pub fn command_slot(cmd: &Cmd) -> Option<u16> {
    command_key(cmd).map(key_slot)
}

/// Whether `cmd` is the command `name`.
fn is(cmd: &Cmd, name: &[u8]) -> bool {
    matches!(cmd.args_iter().next(), Some(redis::Arg::Simple(first)) if first.eq_ignore_ascii_case(name))
}

/// The units of `commands`: each command alone, or a whole `MULTI` ...
/// `EXEC` run; as index ranges, in order.
fn units(commands: &[&Cmd]) -> Vec<std::ops::Range<usize>> {
    let mut units = Vec::new();
    let mut index = 0;
    while index < commands.len() {
        let mut end = index + 1;
        if is(commands[index], b"MULTI") {
            while end < commands.len() && !is(commands[end - 1], b"EXEC") {
                end += 1;
            }
        }
        units.push(index..end);
        index = end;
    }
    units
}

/// The indices of `commands` grouped by slot, in order of first
/// appearance. A `MULTI` ... `EXEC` run stays whole, on the slot of its
/// first keyed command; other commands with no key go with the first group.
#[must_use]
pub fn group_by_slot(commands: &[&Cmd]) -> Vec<Vec<usize>> {
    let mut slots: Vec<Option<u16>> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut keyless = Vec::new();
    for unit in units(commands) {
        let slot = commands[unit.clone()]
            .iter()
            .find_map(|cmd| command_slot(cmd));
        if slot.is_none() {
            keyless.extend(unit);
        } else if let Some(at) = slots.iter().position(|seen| *seen == slot) {
            groups[at].extend(unit);
        } else {
            slots.push(slot);
            groups.push(unit.collect());
        }
    }
    if groups.is_empty() {
        groups.push(Vec::new());
    }
    groups[0].extend(keyless);
    groups[0].sort_unstable();
    groups
}

/// How a pipeline is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// One pipeline per slot.
    BySlot,
    /// One pipeline per command or transaction (each is then redirected
    /// alone: redis-rs resends a redirected pipeline whole).
    ByUnit,
}

/// The pipelines that send `pipeline`'s commands split `by` slot or unit,
/// and which of its commands each holds; `None` when one pipeline can go as
/// it is (atomic, or one part).
#[must_use]
pub fn split_pipeline(pipeline: &Pipeline, by: Split) -> Option<Vec<(Vec<usize>, Pipeline)>> {
    if pipeline.is_transaction() {
        return None;
    }
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let groups: Vec<Vec<usize>> = match by {
        Split::BySlot => group_by_slot(&commands),
        Split::ByUnit => units(&commands)
            .into_iter()
            .map(Iterator::collect)
            .collect(),
    };
    if groups.len() < 2 {
        return None;
    }
    Some(
        groups
            .into_iter()
            .map(|indices| {
                let mut part = redis::pipe();
                for index in &indices {
                    part.add_command(commands[*index].clone());
                }
                (indices, part)
            })
            .collect(),
    )
}

/// A node's address.
pub type Address = (String, u16);

/// Which master serves each slot.
#[derive(Debug, Clone, Default)]
pub struct SlotMap {
    /// `(first slot, last slot, master)`, sorted.
    ranges: Vec<(u16, u16, Address)>,
}

impl SlotMap {
    /// Whether nothing is known yet.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Reads a `CLUSTER SLOTS` reply decoded by redis-rs.
    #[must_use]
    pub fn from_value(reply: &redis::Value, fallback_host: &str) -> Self {
        fn frame(value: &redis::Value) -> BytesFrame {
            match value {
                redis::Value::Int(number) => BytesFrame::Integer(*number),
                redis::Value::BulkString(bytes) => BytesFrame::BulkString(bytes.clone().into()),
                redis::Value::SimpleString(text) => {
                    BytesFrame::SimpleString(text.clone().into_bytes().into())
                }
                redis::Value::Array(items) => BytesFrame::Array(items.iter().map(frame).collect()),
                _ => BytesFrame::Null,
            }
        }
        Self::from_reply(&frame(reply), fallback_host)
    }

    /// Reads a `CLUSTER SLOTS` reply; `fallback_host` stands for a node
    /// that gives no address of its own (an empty host).
    #[must_use]
    pub fn from_reply(reply: &BytesFrame, fallback_host: &str) -> Self {
        let text = |frame: &BytesFrame| -> Option<String> {
            match frame {
                BytesFrame::BulkString(bytes) | BytesFrame::SimpleString(bytes) => {
                    Some(String::from_utf8_lossy(bytes).into_owned())
                }
                _ => None,
            }
        };
        let number = |frame: &BytesFrame| -> Option<i64> {
            match frame {
                BytesFrame::Integer(value) => Some(*value),
                other => text(other)?.parse().ok(),
            }
        };
        let mut ranges = Vec::new();
        if let BytesFrame::Array(rows) = reply {
            for row in rows {
                let BytesFrame::Array(fields) = row else {
                    continue;
                };
                let (Some(first), Some(last), Some(BytesFrame::Array(master))) = (
                    fields.first().and_then(number),
                    fields.get(1).and_then(number),
                    fields.get(2),
                ) else {
                    continue;
                };
                let (Some(host), Some(port)) = (
                    master.first().and_then(text),
                    master.get(1).and_then(number),
                ) else {
                    continue;
                };
                let host = if host.is_empty() || host == "?" {
                    fallback_host.to_owned()
                } else {
                    host
                };
                ranges.push((first as u16, last as u16, (host, port as u16)));
            }
        }
        ranges.sort_by_key(|(first, _, _)| *first);
        Self { ranges }
    }

    /// The master serving `slot`.
    #[must_use]
    pub fn master(&self, slot: u16) -> Option<&Address> {
        let at = self
            .ranges
            .partition_point(|(first, _, _)| *first <= slot)
            .checked_sub(1)?;
        let (_, last, address) = &self.ranges[at];
        (slot <= *last).then_some(address)
    }

    /// Records that `slot` moved to `address` (a `MOVED` reply), until the
    /// next full map.
    pub fn moved(&mut self, slot: u16, address: Address) {
        let mut ranges = Vec::with_capacity(self.ranges.len() + 2);
        for (first, last, owner) in self.ranges.drain(..) {
            if slot < first || slot > last {
                ranges.push((first, last, owner));
                continue;
            }
            if first < slot {
                ranges.push((first, slot - 1, owner.clone()));
            }
            if slot < last {
                ranges.push((slot + 1, last, owner));
            }
        }
        ranges.push((slot, slot, address));
        ranges.sort_by_key(|(first, _, _)| *first);
        self.ranges = ranges;
    }

    /// Every master, once each.
    #[must_use]
    pub fn masters(&self) -> Vec<Address> {
        let mut masters: Vec<Address> = Vec::new();
        for (_, _, address) in &self.ranges {
            if !masters.contains(address) {
                masters.push(address.clone());
            }
        }
        masters
    }
}

/// A redirection a cluster node answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// The slot is served elsewhere from now on.
    Moved(u16, Address),
    /// The slot is being migrated: ask there, this once (`ASKING` first).
    Ask(u16, Address),
    /// A slot in migration, or a cluster not ready: try again shortly.
    Retry,
}

impl Redirect {
    /// The redirection in error `message`, if it is one.
    #[must_use]
    pub fn parse(message: &str) -> Option<Self> {
        let mut words = message.split(' ');
        let kind = words.next()?;
        if kind == "TRYAGAIN" || kind == "CLUSTERDOWN" {
            return Some(Self::Retry);
        }
        let slot: u16 = words.next()?.parse().ok()?;
        let (host, port) = words.next()?.rsplit_once(':')?;
        let address = (host.to_owned(), port.parse().ok()?);
        match kind {
            "MOVED" => Some(Self::Moved(slot, address)),
            "ASK" => Some(Self::Ask(slot, address)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Values from the Redis Cluster specification's examples.
        assert_eq!(key_slot(b"123456789"), 0x31c3 % SLOTS);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn commands_route_by_their_first_key() {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("STREAMS")
            .arg("{q}:s")
            .arg(">");
        assert_eq!(command_key(&read), Some(&b"{q}:s"[..]));
        let mut script = redis::cmd("EVALSHA");
        script.arg("abc").arg(1).arg("k1");
        assert_eq!(command_key(&script), Some(&b"k1"[..]));
        let mut none = redis::cmd("EVALSHA");
        none.arg("abc").arg(0);
        assert_eq!(command_key(&none), None);
        assert_eq!(command_key(&redis::cmd("PING")), None);
    }

    #[test]
    fn pipelines_split_by_slot() {
        let mut pipe = redis::pipe();
        pipe.cmd("SADD").arg("flumeq:queues").arg("a");
        pipe.cmd("XADD")
            .arg("flumeq:{a}:s")
            .arg("*")
            .arg("f")
            .arg("v");
        pipe.cmd("PING");
        pipe.cmd("HINCRBY").arg("flumeq:{a}:stats").arg("n").arg(1);
        let parts = split_pipeline(&pipe, Split::BySlot).expect("two slots");
        let indices: Vec<Vec<usize>> = parts.into_iter().map(|(at, _)| at).collect();
        assert_eq!(indices, vec![vec![0, 2], vec![1, 3]]);
        // Transactions stay whole, on their keys' slot.
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI");
        pipe.cmd("XACK").arg("flumeq:{a}:s").arg("g").arg("1-1");
        pipe.cmd("EXEC");
        pipe.cmd("MULTI");
        pipe.cmd("XACK").arg("flumeq:{b}:s").arg("g").arg("1-1");
        pipe.cmd("EXEC");
        let parts = split_pipeline(&pipe, Split::BySlot).expect("two slots");
        let indices: Vec<Vec<usize>> = parts.into_iter().map(|(at, _)| at).collect();
        assert_eq!(indices, vec![vec![0, 1, 2], vec![3, 4, 5]]);
        pipe.cmd("GET").arg("flumeq:{b}:x");
        let parts = split_pipeline(&pipe, Split::ByUnit).expect("three units");
        let indices: Vec<Vec<usize>> = parts.into_iter().map(|(at, _)| at).collect();
        assert_eq!(indices, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert!(split_pipeline(
            redis::pipe().atomic().cmd("SET").arg("x").arg(1),
            Split::BySlot
        )
        .is_none());
    }

    #[test]
    fn moved_slots_are_remembered() {
        let mut map = SlotMap {
            ranges: vec![(0, 8191, ("a".into(), 1)), (8192, 16383, ("b".into(), 2))],
        };
        assert_eq!(map.master(8191), Some(&("a".into(), 1)));
        map.moved(100, ("b".into(), 2));
        assert_eq!(map.master(100), Some(&("b".into(), 2)));
        assert_eq!(map.master(99), Some(&("a".into(), 1)));
        assert_eq!(map.master(101), Some(&("a".into(), 1)));
        assert_eq!(map.masters().len(), 2);
        assert_eq!(
            Redirect::parse("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved(3999, ("127.0.0.1".into(), 6381)))
        );
        assert_eq!(Redirect::parse("TRYAGAIN x"), Some(Redirect::Retry));
        assert_eq!(Redirect::parse("ERR x"), None);
    }
}
