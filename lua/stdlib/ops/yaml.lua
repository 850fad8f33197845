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

return yaml
