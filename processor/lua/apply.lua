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
  for _, op in ipairs(ops) do
    local f = op['f']
    if op['k'] == 'set' then
      local cur = redis.call('HGET', entity, '~c:' .. f)
      if (not cur) or clock > cur then
        redis.call('HSET', entity, f, op['v'], '~c:' .. f, clock)
      end
    elseif op['k'] == 'status' then
      local rank = tonumber(op['r'])
      local cur_rank = tonumber(redis.call('HGET', entity, '~r:' .. f) or '-1')
      local cur = redis.call('HGET', entity, '~c:' .. f)
      if rank > cur_rank or (rank == cur_rank and ((not cur) or clock > cur)) then
        redis.call('HSET', entity, f, op['v'], '~r:' .. f, rank, '~c:' .. f, clock)
      end
    elseif op['k'] == 'sum' then
      redis.call('HINCRBYFLOAT', entity, f, op['v'])
    elseif op['k'] == 'count' then
      redis.call('HINCRBY', entity, f, 1)
    end
  end
  local last = redis.call('HGET', entity, '~updated')
  if (not last) or clock > last then
    redis.call('HSET', entity, '~updated', clock)
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
