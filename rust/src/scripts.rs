//! Every Lua script flumeq runs, always by SHA (`EVALSHA`, through
//! `redis::Script`), loading it when Redis answers `NOSCRIPT`. Each takes only keys it declares (all of one
//! queue, so with the `{queue}` hash tag they stay legal in Redis Cluster;
//! the cron leases all carry the tag `{cron}`, the global limits `{limits}`).
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

/// Removes entries just acked from a task stream: the ones behind the
/// oldest entry that any group of the stream still has pending or not yet
/// delivered go with one `XTRIM MINID` (whole listpack nodes at a time),
/// the others with `XDEL`. No entry a group still needs is ever removed:
/// the bound is read here, atomically with the trim, and the `XDEL` only
/// happens when the queue's write marker says the transaction that acked
/// the ids was applied (an aborted one acked nothing). Without any group,
/// no trim.
///
/// KEYS[1] stream, KEYS[2] the engine's write marker of the queue. ARGV[1]
/// the sequence number of the write, ARGV[2..] the entry ids it acked, in
/// ascending order. Returns `{trimmed, deleted}`.
pub const TRIM_DONE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, tonumber(ms), tonumber(seq)
end
local text, bms, bseq = nil, nil, nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, delivered = nil, '0-0'
  for i = 1, #group - 1, 2 do
    if group[i] == 'name' then name = group[i + 1]
    elseif group[i] == 'last-delivered-id' then delivered = group[i + 1] end
  end
  local pending = redis.call('XPENDING', KEYS[1], name)
  local id, ms, seq
  if pending[1] > 0 then
    id = pending[2]
    _, ms, seq = parse(id)
  else
    local digits
    digits, ms, seq = parse(delivered)
    seq = seq + 1
    id = digits .. '-' .. string.format('%.0f', seq)
  end
  if bms == nil or ms < bms or (ms == bms and seq < bseq) then
    text, bms, bseq = id, ms, seq
  end
end
local trimmed = 0
if text then trimmed = redis.call('XTRIM', KEYS[1], 'MINID', text) end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {trimmed, 0} end
-- The ids come sorted: find the first one at or past the bound by bisection.
local low, high = 2, #ARGV + 1
while text and low < high do
  local middle = math.floor((low + high) / 2)
  local _, ms, seq = parse(ARGV[middle])
  if ms > bms or (ms == bms and seq >= bseq) then high = middle else low = middle + 1 end
end
local deleted = 0
for i = low, #ARGV, 500 do
  deleted = deleted + redis.call('XDEL', KEYS[1], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
return {trimmed, deleted}
";

/// Keeps a queue's task-history events within their bound: while the
/// stats hash's `history_buffered` (events in the stream) is above the cap,
/// deletes the oldest entries and counts their events as dropped
/// (`history_dropped`). Entries are read two at a time (each may hold a
/// thousand events, so a wide read would copy megabytes into Lua), at most
/// 64 a call, so a call never blocks Redis long; the next write continues.
///
/// KEYS[1] events stream, KEYS[2] stats hash. ARGV[1] most events kept.
/// Returns the events dropped.
pub const TRIM_EVENTS: &str = r"
local cap = tonumber(ARGV[1])
local buffered = tonumber(redis.call('HGET', KEYS[2], 'history_buffered') or '0')
if buffered <= cap then return 0 end
local dropped = 0
local start = '-'
for _ = 1, 32 do
  local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 2)
  if #entries == 0 then
    if dropped == 0 then
      redis.call('HSET', KEYS[2], 'history_buffered', 0)
      return 0
    end
    break
  end
  for _, entry in ipairs(entries) do
    if buffered - dropped <= cap then break end
    local fields = entry[2]
    local n = 0
    for i = 1, #fields - 1, 2 do
      if fields[i] == 'n' then n = tonumber(fields[i + 1]) or 0 end
    end
    redis.call('XDEL', KEYS[1], entry[1])
    dropped = dropped + n
  end
  if buffered - dropped <= cap then break end
  start = '(' .. entries[#entries][1]
end
redis.call('HINCRBY', KEYS[2], 'history_buffered', -dropped)
redis.call('HINCRBY', KEYS[2], 'history_dropped', dropped)
return dropped
";

/// Keeps a queue's summaries of completed tasks (`retention`) within their
/// lifetimes and their bound: deletes those expired, then the oldest past
/// the most kept; at most 1,000 of each kind a call (the next write goes on).
///
/// KEYS[1] the summaries hash, KEYS[2] their expiry ZSET. ARGV[1] now (ms),
/// ARGV[2] most kept. Returns the summaries deleted.
pub const PRUNE_COMPLETED: &str = r"
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000)
local excess = redis.call('ZCARD', KEYS[2]) - #gone - tonumber(ARGV[2])
if excess > 0 then
  local oldest = redis.call('ZRANGE', KEYS[2], #gone, #gone + math.min(excess, 1000) - 1)
  for _, id in ipairs(oldest) do gone[#gone + 1] = id end
end
if #gone == 0 then return 0 end
for i = 1, #gone, 500 do
  local part = {unpack(gone, i, math.min(i + 499, #gone))}
  redis.call('HDEL', KEYS[1], unpack(part))
  redis.call('ZREM', KEYS[2], unpack(part))
end
return #gone
";

/// Acknowledges task-history events a history process wrote into
/// `PostgreSQL`: acks and deletes each entry, and takes the events of those
/// it deleted (not those trimmed meanwhile) off `history_buffered`.
///
/// KEYS[1] events stream, KEYS[2] stats hash. ARGV[1] group, then pairs of
/// entry id and event count. Returns the events taken off.
pub const ACK_EVENTS: &str = r"
local done = 0
for i = 2, #ARGV - 1, 2 do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then done = done + tonumber(ARGV[i + 1]) end
end
if done > 0 then
  local left = redis.call('HINCRBY', KEYS[2], 'history_buffered', -done)
  if left < 0 then redis.call('HSET', KEYS[2], 'history_buffered', 0) end
end
return done
";

/// The Lua shared by the cancel scripts: `ended_cancelled(fields, id)`
/// counts a task (given by its stream fields) as cancelled in the stats
/// hash (`KEYS[2]`), keeps its `cancelled` outcome (`KEYS[3]`, announced on
/// the `ended` stream `KEYS[4]`, capped at `ARGV[3]`) when it keeps one, and
/// returns its unique key or `''`; `now_ms()` is Redis's clock.
macro_rules! ended_cancelled_lua {
    () => {
        r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ended_cancelled(fields, id)
  local kind, ttl, attempt, unique = '?', nil, '0', ''
  for i = 1, #fields - 1, 2 do
    local name, value = fields[i], fields[i + 1]
    if name == 'type' then kind = value
    elseif name == 'result_ttl' then ttl = tonumber(value)
    elseif name == 'attempt' then attempt = value
    elseif name == 'unique_key' then unique = value end
  end
  redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
  redis.call('HINCRBY', KEYS[2], 'cancelled|' .. kind, 1)
  if ttl and ttl > 0 then
    redis.call('DEL', KEYS[3])
    redis.call('HSET', KEYS[3], 'state', 'cancelled', 'attempts', attempt,
      'finished_at', now_ms(), 'reason', 'cancelled', 'error', 'cancelled', 'traceback', '')
    redis.call('PEXPIRE', KEYS[3], math.max(1, math.floor(ttl * 1000)))
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'id', id)
  end
  return unique
end
"
    };
}

/// Cancels a delayed task (scheduled, or waiting for its retry): removes
/// its member from the delayed set and ends it as cancelled, atomically.
///
/// KEYS[1] delayed ZSET, KEYS[2] stats hash, KEYS[3] the task's result
/// hash, KEYS[4] `ended` stream. ARGV[1] the member, ARGV[2] task id,
/// ARGV[3] `ended` max length. Returns the task's unique key (`''`: none),
/// or `false` when the member is not that task's or is gone already.
pub const CANCEL_DELAYED: &str = concat!(
    ended_cancelled_lua!(),
    r"
local ok, fields = pcall(cjson.decode, ARGV[1])
if not ok or type(fields) ~= 'table' then return false end
local id = nil
for i = 1, #fields - 1, 2 do
  if fields[i] == 'id' then id = fields[i + 1] end
end
if id ~= ARGV[2] then return false end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return false end
return ended_cancelled(fields, ARGV[2])
"
);

/// Looks for a task in one page of its queue's stream and cancels it: an
/// entry no consumer was given yet is deleted and ended as cancelled at
/// once; one an engine holds gets a cancel record (`KEYS[5]`, scored by
/// Redis's clock, pruned after `ARGV[6]` ms), which every engine reads.
///
/// KEYS[1] stream, KEYS[2] stats hash, KEYS[3] the task's result hash,
/// KEYS[4] `ended` stream, KEYS[5] cancel records. ARGV[1] group, ARGV[2]
/// task id, ARGV[3] `ended` max length, ARGV[4] exclusive start id (`-`:
/// the beginning), ARGV[5] page size, ARGV[6] record lifetime (ms).
/// Returns `{deleted, recorded, next start or '', unique keys}`.
pub const CANCEL_SCAN: &str = concat!(
    ended_cancelled_lua!(),
    r"
local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if not bms then return true end
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end
-- No group yet: no engine was given any entry.
local delivered = nil
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, group in ipairs(groups) do
    local name, last = nil, nil
    for i = 1, #group - 1, 2 do
      if group[i] == 'name' then name = group[i + 1]
      elseif group[i] == 'last-delivered-id' then last = group[i + 1] end
    end
    if name == ARGV[1] then delivered = last end
  end
end
local start = ARGV[4]
if start ~= '-' then start = '(' .. start end
local size = tonumber(ARGV[5])
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', size)
local deleted, recorded, uniques, last = 0, 0, {}, ''
for _, entry in ipairs(entries) do
  last = entry[1]
  local fields = entry[2]
  local id = nil
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'id' then id = fields[i + 1] break end
  end
  if id == ARGV[2] then
    if delivered == nil or after(entry[1], delivered) then
      redis.call('XDEL', KEYS[1], entry[1])
      uniques[#uniques + 1] = ended_cancelled(fields, ARGV[2])
      deleted = deleted + 1
    else
      recorded = recorded + 1
    end
  end
end
if recorded > 0 then
  local now = now_ms()
  redis.call('ZADD', KEYS[5], now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. (now - tonumber(ARGV[6])))
end
if #entries < size then last = '' end
return {deleted, recorded, last, uniques}
"
);

/// Checks one batch against the global limits of the task types it holds,
/// on Redis's clock (so the engines' clocks need not agree), and takes what
/// the limits allow. All keys carry the tag `{limits}`.
///
/// Rate limits are GCRA: with emission interval `T` (period / limit) and
/// tolerance `τ = T·burst`, a type whose theoretical arrival time is `TAT`
/// admits `floor((now + τ − max(TAT, now)) / T)` tasks, and each admitted one
/// moves `TAT` on by `T`. Concurrency limits are leases: expired ones go
/// first, then a free place is taken by adding the task to the lease set
/// until `now + ttl`. A type with both gets the smaller of the two.
///
/// KEYS per type, in pairs: its rate key, its lease set. ARGV[1] lease TTL
/// (ms); then per type: tasks asking `n`, `T` (ms, `0` = no rate limit),
/// `τ` (ms), concurrency limit (`0` = none), then, only with a concurrency
/// limit, the `n` lease members in batch order. Returns `{now, then per
/// type: admitted, TAT after (or ''), free places before (or -1)}`, times
/// in ms as decimal strings.
pub const LIMITS_ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[1])
local at = 2
local out = {string.format('%.3f', now)}
for i = 1, #KEYS, 2 do
  local n, interval = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  local tau, limit = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  at = at + 4
  local admitted, free, tat = n, -1, ''
  -- A key of another type (written by hand) is replaced, not failed on.
  local kind = redis.call('TYPE', KEYS[i + 1]).ok
  if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', KEYS[i + 1]) end
  kind = redis.call('TYPE', KEYS[i]).ok
  if kind ~= 'string' and kind ~= 'none' then redis.call('DEL', KEYS[i]) end
  if limit > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', now)
    free = math.max(limit - redis.call('ZCARD', KEYS[i + 1]), 0)
    admitted = math.min(admitted, free)
  end
  if interval > 0 then
    -- A value that is not a number (written by hand) counts as none.
    local arrival = tonumber(redis.call('GET', KEYS[i])) or now
    if arrival < now then arrival = now end
    local room = math.floor((now + tau - arrival) / interval)
    admitted = math.max(math.min(admitted, room), 0)
    arrival = arrival + admitted * interval
    if admitted > 0 then
      redis.call('SET', KEYS[i], string.format('%.3f', arrival),
        'PX', math.ceil(arrival - now) + 1)
    end
    tat = string.format('%.3f', arrival)
  end
  if limit > 0 then
    for j = 0, admitted - 1 do
      redis.call('ZADD', KEYS[i + 1], now + ttl, ARGV[at + j])
    end
    at = at + n
  end
  out[#out + 1] = admitted
  out[#out + 1] = tat
  out[#out + 1] = free
end
return out
";

/// Renews an engine's concurrency leases on Redis's clock (adding back one
/// that lapsed meanwhile: its task still runs, so it still counts).
///
/// KEYS the lease sets. ARGV[1] lease TTL (ms); then per key: how many
/// members, then the members. Returns the count renewed.
pub const LEASES_RENEW: &str = r"
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 + tonumber(ARGV[1])
local at, renewed = 2, 0
for i = 1, #KEYS do
  local n = tonumber(ARGV[at])
  for j = 1, n do
    redis.call('ZADD', KEYS[i], until_ms, ARGV[at + j])
  end
  at = at + n + 1
  renewed = renewed + n
end
return renewed
";
