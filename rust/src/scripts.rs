//! Every Lua script flumeq runs, always by SHA (`EVALSHA`, through
//! `redis::Script`), loading it when Redis answers `NOSCRIPT`. Each takes only keys it declares (all of one
//! queue, so with the `{queue}` hash tag they stay legal in Redis Cluster;
//! the cron leases all carry the tag `{cron}`).
//!
//! A delayed task (scheduled or waiting for its retry) is stored in the
//! queue's delayed ZSET as a JSON array of its stream fields,
//! `["id","…","type","…",…]`, scored by its due time in ms: readable with
//! `redis-cli ZRANGE`, and turned back into the same stream entry by `XADD`.

/// Moves due delayed tasks to the stream, atomically.
///
/// KEYS[1] delayed ZSET, KEYS[2] stream, KEYS[3] dead-letter stream.
/// ARGV[1] now (ms), ARGV[2] most tasks to move, ARGV[3] dead-letter max length.
/// Returns `{moved, next_due_ms or -1, still_delayed}`. A member that is not a
/// JSON array of an even number of strings goes to the dead letters with the
/// reason, never silently away.
pub const MOVE_DUE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local ok, fields = pcall(cjson.decode, member)
  local valid = ok and type(fields) == 'table' and #fields > 0 and #fields % 2 == 0
  if valid then
    for _, value in ipairs(fields) do
      if type(value) ~= 'string' then valid = false end
    end
  end
  if valid then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  else
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'reason', 'invalid',
      'error', 'delayed entry is not a JSON array of field/value strings', 'raw', member)
  end
  redis.call('ZREM', KEYS[1], member)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local left = redis.call('ZCARD', KEYS[1])
if first[2] then return {#due, tonumber(first[2]), left} end
return {#due, -1, left}
";

/// Enqueues a task that carries a uniqueness key.
///
/// KEYS[1] the unique-key lock, KEYS[2] stream, KEYS[3] delayed ZSET,
/// KEYS[4] stats hash. ARGV[1] task id, ARGV[2] lock TTL (ms), ARGV[3] due
/// time (ms, 0 = now), ARGV[4] the task as a delayed member (JSON array),
/// ARGV[5] task type, ARGV[6..] the fields. Returns the stream entry id, `''`
/// when scheduled, or `false` when the key is held by a live task (then
/// nothing is written). Counts the task as enqueued in the same step.
pub const ENQUEUE_UNIQUE: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
redis.call('HINCRBY', KEYS[4], 'enqueued', 1)
redis.call('HINCRBY', KEYS[4], 'enqueued|' .. ARGV[5], 1)
if tonumber(ARGV[3]) > 0 then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
  return ''
end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6))
";

/// Enqueues the tick of a cron entry, once: only if no tick of the entry at
/// this time or later was enqueued (so two schedulers that overlap, or one
/// that replays a tick, never append it twice, nor an older one after it).
///
/// KEYS[1] the queue's cron hash (entry -> last tick ms), KEYS[2] stream,
/// KEYS[3] stats hash. ARGV[1] entry name, ARGV[2] tick (ms), ARGV[3] task
/// type, ARGV[4..] the fields. Returns the entry id, or `false` (nothing
/// written) when the tick was enqueued already.
pub const CRON_TICK: &str = r"
-- A value that is not a number (written by hand) counts as no tick yet.
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or -1
if last >= tonumber(ARGV[2]) then return false end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'enqueued', 1)
redis.call('HINCRBY', KEYS[3], 'enqueued|' .. ARGV[3], 1)
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
";

/// Takes or keeps the scheduler leases of cron entries (all under the tag
/// `{cron}`): a free lease is taken, one held by `ARGV[1]` is extended,
/// another holder's is left. With a TTL of 0, those held are let go.
///
/// KEYS the leases. ARGV[1] holder, ARGV[2] TTL (ms). Returns per key 1 when
/// held by the holder now, else 0.
pub const CRON_LEASES: &str = r"
local held = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  held[i] = 0
  if ARGV[2] == '0' then
    if owner == ARGV[1] then redis.call('DEL', key) end
  elseif owner == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held[i] = 1
  elseif not owner then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    held[i] = 1
  end
end
return held
";

/// Releases a uniqueness key if it still belongs to the task.
///
/// KEYS[1] the unique-key lock. ARGV[1] task id. Returns 1 if released.
pub const RELEASE_UNIQUE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Moves dead letters back to the stream as fresh tasks (attempt 0). The
/// fields it drops are `envelope::DEAD_LETTER_FIELDS` plus `attempt`.
///
/// KEYS[1] dead-letter stream, KEYS[2] stream.
/// ARGV[1] start id (exclusive cursor; '-' for the beginning), ARGV[2] batch
/// size, ARGV[3..] task ids to requeue (none = all).
/// Returns `{moved, next cursor or ''}` so callers walk big streams in steps.
pub const REQUEUE_DEAD: &str = r"
local wanted = nil
if #ARGV > 2 then
  wanted = {}
  for i = 3, #ARGV do wanted[ARGV[i]] = true end
end
local start = ARGV[1]
if start ~= '-' then start = '(' .. start end
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', tonumber(ARGV[2]))
local skip = {reason=true, error=true, traceback=true, attempts=true, failed_at=true,
  origin_id=true, raw=true, attempt=true}
local moved = 0
local last = ''
for _, entry in ipairs(entries) do
  last = entry[1]
  local fields = entry[2]
  local id = nil
  local copy = {}
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then id = fields[i + 1] end
    if not skip[fields[i]] then
      copy[#copy + 1] = fields[i]
      copy[#copy + 1] = fields[i + 1]
    end
  end
  if id and (wanted == nil or wanted[id]) then
    copy[#copy + 1] = 'attempt'
    copy[#copy + 1] = '0'
    redis.call('XADD', KEYS[2], '*', unpack(copy))
    redis.call('XDEL', KEYS[1], entry[1])
    moved = moved + 1
  end
end
if #entries < tonumber(ARGV[2]) then last = '' end
return {moved, last}
";

/// Deletes a dead-letter stream and says how many entries it held. `UNLINK`
/// frees a large stream in the background instead of blocking Redis.
///
/// KEYS[1] dead-letter stream. Returns the count removed.
pub const PURGE_DEAD: &str = r"
local count = redis.call('XLEN', KEYS[1])
redis.call('UNLINK', KEYS[1])
return count
";

/// Keeps an engine's own long-running entries fresh, so XAUTOCLAIM on other
/// engines does not take them; skips any entry that is no longer ours.
///
/// KEYS[1] stream. ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids.
/// Returns the count refreshed.
pub const REFRESH_OWN: &str = r"
local count = 0
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    count = count + 1
  end
end
return count
";
