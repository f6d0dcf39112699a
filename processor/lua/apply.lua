-- Applies a chunk of events to one projection, each at most once per version.
-- KEYS[1] = current version pointer of the projection (absent = version 1)
-- KEYS[2] = building version pointer (set while a rebuild runs: dual-write)
-- ARGV[1] = key prefix of the projection's versions, e.g. "hooklog:{orders}:v"
-- ARGV[2] = idempotency marker TTL in seconds
-- ARGV[3] = "" for live (current + building), or one version number (rebuild)
-- ARGV[4] = the updates, in order, JSON:
--   [{i = event id, e = entity key, c = clock, s = 1 to return the state,
--     o = [{k = set|status|sum|count, f = field, v = json text, r = rank}]}]
--   clock = zero-padded event time in ms, "|", event id (last writer wins)
-- Returns {version of the states, {applied 1/0 per update},
--          {flat HGETALL per update with s = 1, in order}}.
--
-- One call per chunk instead of one per event: the pointers are read once,
-- each entity is read once (HGETALL) and written once (HSET) however many
-- of its events the chunk holds, and only the idempotency marker and the
-- float sums stay per event (HINCRBYFLOAT per event keeps the live and the
-- rebuilt totals bit-identical whatever the chunking).
--
-- State keys are derived from the pointers read here, inside the same
-- script, so a rebuild's switch can never interleave with an apply. They
-- share the projection's hash tag, so they live in one cluster slot.

local updates = cjson.decode(ARGV[4])
local ttl = ARGV[2]

local function load(key)
  local flat = redis.call('HGETALL', key)
  local now = {}
  for i = 1, #flat, 2 do
    now[flat[i]] = flat[i + 1]
  end
  return {now = now, out = {}, counts = {}}
end

-- Applies one update's operations to the in-memory entity.
local function fold(ent, key, clock, ops)
  local now, out = ent.now, ent.out
  local function put(field, value)
    now[field] = value
    out[field] = value
  end
  for _, op in ipairs(ops) do
    local f = op['f']
    if op['k'] == 'set' then
      local cur = now['~c:' .. f]
      if (not cur) or clock > cur then
        put(f, op['v'])
        put('~c:' .. f, clock)
      end
    elseif op['k'] == 'status' then
      local rank = tonumber(op['r'])
      local cur_rank = tonumber(now['~r:' .. f] or '-1')
      local cur = now['~c:' .. f]
      if rank > cur_rank or (rank == cur_rank and ((not cur) or clock > cur)) then
        put(f, op['v'])
        put('~r:' .. f, tostring(rank))
        put('~c:' .. f, clock)
      end
    elseif op['k'] == 'sum' then
      redis.call('HINCRBYFLOAT', key, f, op['v'])
    elseif op['k'] == 'count' then
      ent.counts[f] = (ent.counts[f] or 0) + 1
    end
  end
  local last = now['~updated']
  if (not last) or clock > last then
    put('~updated', clock)
  end
end

local function apply(base)
  local applied = {}
  local entities, order = {}, {}
  for n, u in ipairs(updates) do
    applied[n] = 0
    if redis.call('SET', base .. ':seen:' .. u['i'], '1', 'NX', 'EX', ttl) then
      applied[n] = 1
      local key = base .. ':e:' .. u['e']
      local ent = entities[key]
      if not ent then
        ent = load(key)
        entities[key] = ent
        order[#order + 1] = key
      end
      fold(ent, key, u['c'], u['o'])
    end
  end
  for _, key in ipairs(order) do
    local ent = entities[key]
    local flat = {}
    for field, value in pairs(ent.out) do
      flat[#flat + 1] = field
      flat[#flat + 1] = value
    end
    if #flat > 0 then
      redis.call('HSET', key, unpack(flat))
    end
    for field, n in pairs(ent.counts) do
      redis.call('HINCRBY', key, field, n)
    end
  end
  return applied
end

local targets
if ARGV[3] ~= '' then
  targets = {ARGV[3]}
else
  local current = redis.call('GET', KEYS[1]) or '1'
  targets = {current}
  local building = redis.call('GET', KEYS[2])
  if building and building ~= current then
    table.insert(targets, building)
  end
end

local applied
for i, version in ipairs(targets) do
  local a = apply(ARGV[1] .. version)
  if i == 1 then applied = a end
end
local states = {}
for _, u in ipairs(updates) do
  if u['s'] == 1 then
    states[#states + 1] = redis.call('HGETALL', ARGV[1] .. targets[1] .. ':e:' .. u['e'])
  end
end
return {targets[1], applied, states}
