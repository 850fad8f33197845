--- ops.json: JSON to and from Lua. Decoding is lua-cjson's; encoding is done here, because
-- the cjson we link (2.1.0) writes integers past 10^14 with 14 significant digits, cannot
-- write an empty array, escapes "/" and orders keys by hash. Reference: docs/parts/yaml-json.md.
local cjson = require "cjson"
local yaml = require "ops.yaml"

local null = yaml.null
-- Both nulls are lightuserdata NULL, so decoded JSON nulls are ops.yaml.null without a pass.
assert(cjson.null == null, "cjson.null is not lightuserdata NULL")

local MAX_DEPTH = 512

local decoder = cjson.new() -- our own settings, whatever other users of cjson change
decoder.decode_max_depth(MAX_DEPTH)
decoder.decode_invalid_numbers(false) -- NaN, Infinity and hex are not JSON

local json = { null = null, array = yaml.array, object = yaml.object }

local array_mt = getmetatable(yaml.array())
local object_mt = getmetatable(yaml.object())
local math_type, tointeger = math.type, math.tointeger

-- cjson gives every number as a float; 8080 should read back as the integer 8080.
local function integers(v)
  for k, x in next, v do
    if math_type(x) == "float" then
      local i = tointeger(x)
      if i then v[k] = i end
    elseif type(x) == "table" then
      integers(x)
    end
  end
end

--- json.decode(text [, name]) -> value | nil, err, "EJSON"
function json.decode(text, name)
  if type(text) ~= "string" then
    error(("bad argument #1 to 'decode' (string expected, got %s)"):format(type(text)), 2)
  end
  local ok, value = pcall(decoder.decode, text)
  if not ok then
    local msg = tostring(value)
    local at = tonumber(msg:match("at character (%d+)")) or 1
    local before = text:sub(1, at - 1)
    local line = select(2, before:gsub("\n", "")) + 1
    local after_newline = before:match(".*\n()")
    local column = after_newline and at - after_newline + 1 or at
    return nil, ("%s:%d:%d: %s"):format(name or "<json>", line, column, msg), "EJSON"
  end
  if type(value) == "table" then
    integers(value)
  elseif math_type(value) == "float" then
    value = tointeger(value) or value
  end
  return value
end

local escapes = {
  ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
}
local function escape(c) return escapes[c] or ("\\u%04x"):format(c:byte()) end

local EncodeError = {}

local function fail(state, what)
  local parts = { "$" }
  for i = 1, state.depth do
    local k = state.path[i]
    parts[#parts + 1] = type(k) == "string" and "." .. k or "[" .. tostring(k) .. "]"
  end
  error(setmetatable({ message = ("json.encode: %s at %s"):format(what, table.concat(parts)) },
    EncodeError))
end

local function quote(state, s)
  if not utf8.len(s) then fail(state, "string is not valid UTF-8") end
  return '"' .. s:gsub('[%c"\\]', escape) .. '"'
end

local function number(state, x)
  if math_type(x) == "integer" then return ("%d"):format(x) end
  if x ~= x or x == math.huge or x == -math.huge then
    fail(state, (x ~= x and "NaN" or x > 0 and "infinity" or "-infinity") .. " has no JSON form")
  end
  local s = ("%.15g"):format(x)
  if tonumber(s) ~= x then s = ("%.16g"):format(x) end
  if tonumber(s) ~= x then s = ("%.17g"):format(x) end
  if s:find("^-?%d+$") then s = s .. ".0" end -- keeps a float a float for other readers
  return s
end

local function key_string(state, k)
  local t = type(k)
  if t == "string" then return k end
  if t == "number" then return number(state, k) end
  if t == "boolean" then return tostring(k) end
  if k == null then return "null" end
  fail(state, "a key cannot be a " .. t)
end

local encode_value

local function encode_table(state, t, out)
  local depth = state.depth
  if depth >= MAX_DEPTH then fail(state, ("nesting is deeper than %d levels"):format(MAX_DEPTH)) end
  if state.open[t] then fail(state, "a table contains itself") end
  state.open[t] = true
  local count, max, all_int = 0, 0, true
  for k in next, t do
    count = count + 1
    if math_type(k) == "integer" and k >= 1 then
      if k > max then max = k end
    else
      all_int = false
    end
  end
  local mt = getmetatable(t)
  if mt == array_mt and count > 0 and not (all_int and max == count) then
    fail(state, "a table marked as an array has keys other than 1..n")
  end
  local nl = state.indent and "\n" .. state.indent:rep(depth + 1)
  local close_nl = state.indent and "\n" .. state.indent:rep(depth)
  local colon = state.indent and ": " or ":"
  state.depth = depth + 1
  if mt == array_mt or (count > 0 and all_int and max == count and mt ~= object_mt) then
    out[#out + 1] = "["
    for i = 1, count do
      if i > 1 then out[#out + 1] = "," end
      if nl then out[#out + 1] = nl end
      state.path[depth + 1] = i
      encode_value(state, t[i], out)
    end
    if nl and count > 0 then out[#out + 1] = close_nl end
    out[#out + 1] = "]"
  else
    local keys, by_string = {}, {}
    for k in next, t do
      state.path[depth + 1] = k
      local s = key_string(state, k)
      if by_string[s] ~= nil then fail(state, ("two keys are both written %q"):format(s)) end
      by_string[s] = k
      keys[#keys + 1] = s
    end
    table.sort(keys)
    out[#out + 1] = "{"
    for i, s in ipairs(keys) do
      if i > 1 then out[#out + 1] = "," end
      if nl then out[#out + 1] = nl end
      state.path[depth + 1] = by_string[s]
      out[#out + 1] = quote(state, s)
      out[#out + 1] = colon
      encode_value(state, t[by_string[s]], out)
    end
    if nl and count > 0 then out[#out + 1] = close_nl end
    out[#out + 1] = "}"
  end
  state.depth = depth
  state.open[t] = nil
end

function encode_value(state, v, out)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = quote(state, v)
  elseif t == "number" then
    out[#out + 1] = number(state, v)
  elseif t == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif v == null or t == "nil" then
    out[#out + 1] = "null"
  elseif t == "table" then
    encode_table(state, v, out)
  else
    fail(state, "cannot encode a " .. t)
  end
end

--- json.encode(value [, {indent = n}]) -> text | nil, err, "EJSON"
-- Keys are sorted; an empty table is {} unless marked with json.array.
function json.encode(value, opts)
  local indent = opts and opts.indent
  if indent ~= nil and math_type(indent) ~= "integer" then
    error("bad argument #2 to 'encode' (opts.indent must be an integer)", 2)
  end
  local state = {
    depth = 0, path = {}, open = {},
    indent = indent and indent > 0 and (" "):rep(indent) or nil,
  }
  local out = {}
  local ok, err = pcall(encode_value, state, value, out)
  if not ok then
    if getmetatable(err) == EncodeError then return nil, err.message, "EJSON" end
    error(err, 0)
  end
  return table.concat(out)
end

return json
