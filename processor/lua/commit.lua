-- Writes a batch's folded entities, each only if nobody wrote it since the
-- processor read it (compare-and-set on the entity's `~rev`), together with
-- the idempotency markers of the events folded into it. The merge itself
-- happens in the processor (src/projection/fold.rs); this script only makes
-- "still as read? then write state and markers" one atomic step.
--
-- ARGV[1] = current version pointer key (absent = version 1)
-- ARGV[2] = building version pointer key
-- ARGV[3] = "1": live apply, check the pointers; "": a rebuild's own version
-- ARGV[4] = current version as read; ARGV[5] = building version as read or ""
-- ARGV[6] = idempotency marker TTL in seconds
-- ARGV[7..] = groups, each: entity hash key, expected `~rev` ("0" = absent),
--   marker count, the marker keys, field count, then field, value pairs
--   (the new `~rev` among them)
-- Returns -1 when a rebuild switched versions since the read (nothing
-- written), else one flag per group: 0 written, 1 changed meanwhile (not
-- written; the processor re-reads and folds it again).
--
-- Keys are built by the processor from the pointers it read, and checked
-- here against the pointers in the same atomic step, so a rebuild's switch
-- never interleaves with an apply. They share the projection's hash tag.

if ARGV[3] == '1' then
  local current = redis.call('GET', ARGV[1]) or '1'
  local building = redis.call('GET', ARGV[2]) or ''
  if building == current then building = '' end
  if current ~= ARGV[4] or building ~= ARGV[5] then
    return -1
  end
end

local ttl = ARGV[6]
local result = {}
local a = 7
while a <= #ARGV do
  local key, expected = ARGV[a], ARGV[a + 1]
  local markers = tonumber(ARGV[a + 2])
  local first_marker = a + 3
  local nfields = tonumber(ARGV[first_marker + markers])
  local first_field = first_marker + markers + 1
  local next_group = first_field + 2 * nfields
  if (redis.call('HGET', key, '~rev') or '0') == expected then
    for m = first_marker, first_marker + markers - 1 do
      redis.call('SET', ARGV[m], '1', 'EX', ttl)
    end
    if nfields > 0 then
      redis.call('HSET', key, unpack(ARGV, first_field, next_group - 1))
    end
    result[#result + 1] = 0
  else
    result[#result + 1] = 1
  end
  a = next_group
end
return result
