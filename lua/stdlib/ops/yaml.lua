--- ops.yaml: YAML 1.1, typed the way PyYAML (and so BitOps) reads it, to and from Lua.
-- Reference: docs/parts/yaml-json.md.
local core = require "ops.core.yaml"

local yaml = {
  load = core.load,           -- (text [, name]) -> value | nil, err, "EYAML"
  load_all = core.load_all,   -- (text [, name]) -> {doc, ...} | nil, err, "EYAML"
  load_file = core.load_file, -- (path) -> value | nil, err, code
  dump = core.dump,           -- (value) -> text; raises on functions, cycles, ...
  -- Shared with ops.json and equal to cjson.null: a lightuserdata NULL. It is truthy.
  null = core.null,
}

local function mark(t, mt, fname)
  if t == nil then t = {} end
  if type(t) ~= "table" then
    error(("bad argument #1 to '%s' (table expected, got %s)"):format(fname, type(t)), 3)
  end
  return setmetatable(t, mt)
end

--- yaml.array([t]) -> t: dump and ops.json.encode write t as a sequence, even when empty.
function yaml.array(t) return mark(t, core.array_mt, "array") end

--- yaml.object([t]) -> t: dump and ops.json.encode write t as a mapping, even with keys 1..n.
function yaml.object(t) return mark(t, core.object_mt, "object") end

--- yaml.keys(map) -> the keys of a mapping in the order the document wrote them; keys
--- brought in by a merge key (<<) and keys of tables not loaded from YAML follow, sorted.
--- BitOps relies on order in places (bitops.deployments), which a Lua table loses.
function yaml.keys(map)
  if type(map) ~= "table" then
    error(("bad argument #1 to 'keys' (table expected, got %s)"):format(type(map)), 2)
  end
  local out, seen = {}, {}
  for _, k in ipairs(core.key_order(map) or {}) do
    if not seen[k] and map[k] ~= nil then
      seen[k] = true
      out[#out + 1] = k
    end
  end
  local rest = {}
  for k in pairs(map) do
    if not seen[k] then rest[#rest + 1] = k end
  end
  table.sort(rest, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(rest) do out[#out + 1] = k end
  return out
end

return yaml
