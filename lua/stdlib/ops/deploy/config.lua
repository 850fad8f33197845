-- ops.deploy.config: BitOps configuration files, read against a tool's schema.
-- Precedence: BITOPS_<TOOL>_<KEY> variable > the schema's export_env variable > the file >
-- the schema's default. A `false` in the file is kept (BitOps drops it).
local yaml = require "ops.yaml"
local fs = require "ops.fs"
local failure = require "ops.deploy.failure"
local sys = require "ops.sys"

local config = {}

local function is_null(v) return v == nil or v == yaml.null end

local array_mt -- ops.core.yaml's metatable of sequences, looked up on first use

local function is_sequence(t)
  if type(t) ~= "table" then return false end
  array_mt = array_mt or require("ops.core.yaml").array_mt
  if getmetatable(t) == array_mt then return true end
  local n = #t
  if n == 0 then return false end
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 or k > n then return false end
  end
  return true
end

--- config.deep_merge(base, over) -> a new table: mappings merged key by key (over wins),
--- sequences and scalars replaced whole by over's
function config.deep_merge(base, over)
  if type(base) ~= "table" or type(over) ~= "table" or is_sequence(base) or is_sequence(over) then
    if over == nil then return base end
    return over
  end
  local out = {}
  for k, v in pairs(base) do out[k] = v end
  for k, v in pairs(over) do
    if out[k] ~= nil then out[k] = config.deep_merge(out[k], v) else out[k] = v end
  end
  return out
end

--- config.load_yaml(path, shown) -> table ({} for an empty file); a missing file is nil.
--- Malformed YAML fails naming shown:line:column.
function config.load_yaml(path, shown)
  if not fs.exists(path) then return nil end
  local text, err = fs.read(path)
  if not text then failure.raise(err) end
  local v, yerr = yaml.load(text, shown or path)
  if v == nil then failure.raise(yerr) end
  if is_null(v) then return {} end
  if type(v) ~= "table" or is_sequence(v) then
    failure.raise((shown or path) .. ": expected a mapping of settings at the top level")
  end
  return v
end

local function env_key(tool, path)
  return ("BITOPS_" .. tool .. "_" .. table.concat(path, "_")):upper():gsub("[^%w]", "_")
end

local function describe(v)
  if type(v) == "string" then return string.format("the string %q", v) end
  if type(v) == "table" then return is_sequence(v) and "a list" or "a mapping" end
  return "the " .. type(v) .. " " .. tostring(v)
end

--- config.describe(v) -> how a message names a wrong value ("the string \"x\"", "a list", "the number 5")
config.describe = describe

local TRUE = {["true"] = true, yes = true, on = true, ["1"] = true}
local FALSE = {["false"] = true, no = true, off = true, ["0"] = true}

local NUL = "contains a NUL byte (\\0), which no command line or variable can carry"

-- Converts a value to the schema's type; returns value or nil, reason.
local function coerce(v, spec, from_env)
  local t = spec.type or "string"
  if type(v) == "string" and v:find("\0", 1, true) then return nil, NUL end
  if t == "string" then
    if type(v) == "string" then return v end
    if type(v) == "number" then return tostring(v) end
    return nil, "must be a string, not " .. describe(v)
  elseif t == "boolean" then
    if type(v) == "boolean" then return v end
    if type(v) == "string" and (from_env or true) then
      local l = v:lower()
      if TRUE[l] then return true end
      if FALSE[l] then return false end
    end
    return nil, "must be true or false, not " .. describe(v)
  elseif t == "number" then
    local n = tonumber(v)
    if n then return n end
    return nil, "must be a number, not " .. describe(v)
  elseif t == "list" then
    if type(v) == "string" and from_env then
      local out = {}
      for item in v:gmatch("[^,]+") do out[#out + 1] = item:match("^%s*(.-)%s*$") end
      return out
    end
    if type(v) == "string" or type(v) == "number" then return {tostring(v)} end
    if type(v) == "table" and (is_sequence(v) or next(v) == nil) then
      local out = {}
      for i, item in ipairs(v) do
        if type(item) ~= "string" and type(item) ~= "number" and type(item) ~= "boolean" then
          return nil, "item " .. i .. " must be a string, not " .. describe(item)
        end
        if type(item) == "string" and item:find("\0", 1, true) then return nil, "item " .. i .. " " .. NUL end
        out[i] = tostring(item)
      end
      return out
    end
    return nil, "must be a list, not " .. describe(v)
  end
  error("schema: unknown type '" .. tostring(t) .. "'")
end

local function export_string(v)
  if type(v) == "table" then return table.concat(v, ",") end
  return tostring(v)
end

-- A schema compiled for one tool: its settings in a flat list, each with where it sits
-- and the variables that may set it, made once (resolve runs for every step).
local compiled = setmetatable({}, {__mode = "k"})

local function compile(schema, tool)
  local by_tool = compiled[schema]
  if not by_tool then
    by_tool = {}
    compiled[schema] = by_tool
  end
  local c = by_tool[tool]
  if c then return c end
  c = {sections = {}, settings = {}, objects = {}}
  local function walk(props, path)
    local keys = {}
    for key in pairs(props) do keys[#keys + 1] = key end
    table.sort(keys)
    for _, key in ipairs(keys) do
      local spec = props[key]
      local p = {table.unpack(path)}
      p[#p + 1] = key
      if spec.type == "object" then
        c.objects[#c.objects + 1] = p
        walk(spec.properties or {}, p)
      else
        -- BITOPS_<TOOL>_<KEY>, then BitOps 2's BITOPS_<EXPORT_ENV>, then <EXPORT_ENV>
        local names = {env_key(tool, {table.unpack(p, 2)})}
        if spec.export_env then
          names[2] = "BITOPS_" .. spec.export_env
          names[3] = spec.export_env
        end
        c.settings[#c.settings + 1] = {path = p, spec = spec, names = names, key = p[#p],
          export = spec.export_env, bitops_export = spec.export_env and "BITOPS_" .. spec.export_env}
      end
    end
  end
  for name in pairs(schema) do c.sections[#c.sections + 1] = name end
  table.sort(c.sections)
  for _, name in ipairs(c.sections) do walk(schema[name], {name}) end
  by_tool[tool] = c
  return c
end

--- config.resolve(schema, file_table, ctx) -> cfg, exports, warnings
--- Precedence for each key: BITOPS_<TOOL>_<KEY> > BITOPS_<EXPORT_ENV> > <EXPORT_ENV> > the file
--- > the default. Empty variables are ignored.
--- ctx = {tool = "terraform", where = "environment 'prod': terraform step",
---        file = "prod/terraform/bitops.config.yaml", getenv = function(name) ... end}
--- (getenv defaults to the process environment, as sys.environ_view sees it)
--- cfg has the schema's sections (cli, options, ...); exports maps export_env names to
--- strings for hooks and tools.
function config.resolve(schema, file_table, ctx)
  local getenv, env = ctx.getenv, nil
  if not getenv then env = sys.environ_view() end -- a table lookup per name, not a scan of environ
  local exports, warnings = {}, {}
  local body = file_table or {}
  local function bad(path, why)
    failure.raise(string.format("%s: %s %s (%s)", ctx.where, table.concat(path, "."), why, ctx.file))
  end
  -- BitOps nests the settings under the tool's name; accept both forms (`terraform:` with
  -- nothing under it: no settings)
  local nested = body[ctx.tool]
  if nested ~= nil and schema[ctx.tool] == nil then
    if is_null(nested) then
      local rest = {}
      for k, v in pairs(body) do if k ~= ctx.tool then rest[k] = v end end
      body = rest
    elseif type(nested) ~= "table" or (next(nested) ~= nil and is_sequence(nested)) then
      bad({ctx.tool}, "must be a mapping (cli:, options:), not " .. describe(nested))
    else
      body = nested
    end
  end
  local c = compile(schema, ctx.tool)

  -- the file's shape: every level the schema has is a mapping; keys it does not know warn
  -- (path: the keys down to section; a key's own path is made only to be named)
  local function check(props, section, path)
    if is_null(section) then return end
    if type(section) ~= "table" or is_sequence(section) then bad(path, "must be a mapping, not " .. describe(section)) end
    for key, v in pairs(section) do
      local spec = props[key]
      if spec == nil or spec.type == "object" then
        local p = {table.unpack(path)}
        p[#p + 1] = tostring(key)
        if spec == nil then
          warnings[#warnings + 1] = string.format("%s: %s is not a setting opsrun knows; ignored (%s)",
            ctx.where, table.concat(p, "."), ctx.file)
        else
          check(spec.properties or {}, v, p)
        end
      end
    end
  end
  local sections = c.sections
  for i = 1, #sections do
    local name = sections[i]
    check(schema[name], body[name], {name})
  end
  for key in pairs(body) do
    if schema[key] == nil then
      warnings[#warnings + 1] = string.format("%s: %s is not a section opsrun knows (%s); ignored",
        ctx.where, tostring(key), ctx.file)
    end
  end

  local cfg = {}
  for i = 1, #sections do cfg[sections[i]] = {} end
  local objects = c.objects
  for i = 1, #objects do -- parents come before their children
    local p = objects[i]
    local out = cfg
    for j = 1, #p - 1 do out = out[p[j]] end
    out[p[#p]] = {}
  end
  local settings = c.settings
  for si = 1, #settings do
    local setting = settings[si]
    local p, spec = setting.path, setting.spec
    -- where the value sits in cfg and in the file (levels the file lacks are nil)
    local out, section = cfg, body
    for i = 1, #p - 1 do
      out = out[p[i]]
      if section ~= nil then
        section = section[p[i]]
        if section == yaml.null then section = nil end
      end
    end
    local key = setting.key
    local value, why, from
    -- a variable set to "" counts as not set (CI templates pass empty ones)
    local names = setting.names
    for i = 1, #names do
      local v
      if env then v = env[names[i]] else v = getenv(names[i]) end
      if v ~= nil and v ~= "" then
        from = v
        break
      end
    end
    if from ~= nil then
      value, why = coerce(from, spec, true)
      if value == nil then bad(p, why .. " (from the environment)") end
    elseif section ~= nil and section[key] ~= nil and section[key] ~= yaml.null then
      value, why = coerce(section[key], spec, false)
      if value == nil then bad(p, why) end
    else
      value = spec.default
    end
    if value == nil and spec.required then bad(p, "is required") end
    if value ~= nil and spec.enum then
      local okv = false
      for _, e in ipairs(spec.enum) do if e == value then okv = true end end
      if not okv then bad(p, "must be one of " .. table.concat(spec.enum, ", ") .. ", not " .. describe(value)) end
    end
    out[key] = value
    if setting.export and value ~= nil then
      local text = export_string(value)
      exports[setting.export] = text
      exports[setting.bitops_export] = text
    end
  end
  return cfg, exports, warnings
end

--- config.is_sequence(t) -> boolean
config.is_sequence = is_sequence

return config
