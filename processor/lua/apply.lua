-- Applies one event to one projection entity, at most once per version.
-- KEYS[1] = current version pointer of the projection (absent = version 1)
-- KEYS[2] = building version pointer (set while a rebuild runs: dual-write)
-- ARGV[1] = key prefix of the projection's versions, e.g. "hooklog:{orders}:v"
-- ARGV[2] = event id
-- ARGV[3] = entity key
-- ARGV[4] = clock: zero-padded event time in ms, "|", event id (orders LWW)
-- ARGV[5] = idempotency marker TTL in seconds
-- ARGV[6] = operations, JSON [{k=set|status|sum|count, f=field, v=json text, r=rank}]
-- ARGV[7] = "" for live (current + building), or one version number (rebuild)
-- ARGV[8] = "1" to return the entity's state, "" to skip it
-- Returns {applied (1/0), version of the state, flat HGETALL or {}}.
--
-- State keys are derived from the pointers read here, inside the same
-- script, so a rebuild's switch can never interleave with an apply. They
-- share the projection's hash tag, so they live in one cluster slot.

local ops = cjson.decode(ARGV[6])
local clock = ARGV[4]

local function apply(base)
  local seen = base .. ':seen:' .. ARGV[2]
  if not redis.call('SET', seen, '1', 'NX', 'EX', ARGV[5]) then
    return 0
  end
  local entity = base .. ':e:' .. ARGV[3]
  -- Read every clock and rank this event compares against in one HMGET,
  -- and write every winning field in one HSET: two calls instead of two
  -- per field.
  local names = {'~updated'}
  for _, op in ipairs(ops) do
    if op['k'] == 'set' then
      names[#names + 1] = '~c:' .. op['f']
    elseif op['k'] == 'status' then
      names[#names + 1] = '~c:' .. op['f']
      names[#names + 1] = '~r:' .. op['f']
    end
  end
  local values = redis.call('HMGET', entity, unpack(names))
  local now = {}
  for i, name in ipairs(names) do
    now[name] = values[i]
  end
  local out = {}
  local function put(field, value)
    out[#out + 1] = field
    out[#out + 1] = value
  end
  for _, op in ipairs(ops) do
    local f = op['f']
    if op['k'] == 'set' then
      local cur = now['~c:' .. f]
      if (not cur) or clock > cur then
        put(f, op['v'])
        put('~c:' .. f, clock)
        now['~c:' .. f] = clock
      end
    elseif op['k'] == 'status' then
      local rank = tonumber(op['r'])
      local cur_rank = tonumber(now['~r:' .. f] or '-1')
      local cur = now['~c:' .. f]
      if rank > cur_rank or (rank == cur_rank and ((not cur) or clock > cur)) then
        put(f, op['v'])
        put('~r:' .. f, rank)
        put('~c:' .. f, clock)
        now['~r:' .. f] = tostring(rank)
        now['~c:' .. f] = clock
      end
    elseif op['k'] == 'sum' then
      redis.call('HINCRBYFLOAT', entity, f, op['v'])
    elseif op['k'] == 'count' then
      redis.call('HINCRBY', entity, f, 1)
    end
  end
  local last = now['~updated']
  if (not last) or clock > last then
    put('~updated', clock)
  end
  if #out > 0 then
    redis.call('HSET', entity, unpack(out))
  end
  return 1
end

local targets
if ARGV[7] ~= '' then
  targets = {ARGV[7]}
else
  local current = redis.call('GET', KEYS[1]) or '1'
  targets = {current}
  local building = redis.call('GET', KEYS[2])
  if building and building ~= current then
    table.insert(targets, building)
  end
end

local applied = 0
for i, version in ipairs(targets) do
  local a = apply(ARGV[1] .. version)
  if i == 1 then applied = a end
end
if ARGV[8] ~= '1' then
  return {applied, targets[1], {}}
end
return {applied, targets[1], redis.call('HGETALL', ARGV[1] .. targets[1] .. ':e:' .. ARGV[3])}
