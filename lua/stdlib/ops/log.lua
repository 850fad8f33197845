-- ops.log: what opsrun tells its user, on stderr.
-- Text for people (colour only on a terminal and without NO_COLOR), or JSON lines
-- (--log-format json, OPSRUN_LOG_FORMAT=json). Every registered secret and mask is
-- redacted from everything logged, and from whatever else calls log.redact.
local sys = require "ops.core.sys"
local time = require "ops.core.time"
local json = require "ops.json"

local log = {}

local LEVELS = {debug = 10, info = 20, warn = 30, error = 40, off = 100}
local COLOURS = {debug = "\27[2m", info = "\27[36m", warn = "\27[33m", error = "\27[31m"}

local state = {
  level = LEVELS[(sys.getenv("OPSRUN_LOG_LEVEL") or "info"):lower()] or LEVELS.info,
  format = (sys.getenv("OPSRUN_LOG_FORMAT") == "json") and "json" or "text",
  colour = nil, -- decided on first use
  out = io.stderr,
}
local secrets = {} -- sorted longest first, so a secret inside another is covered
local masks = {}   -- Lua patterns

local REDACTED = "***"

--- log.secret(value) -> value : value is replaced by *** in everything logged
function log.secret(value)
  if type(value) ~= "string" or #value < 3 then return value end
  for _, s in ipairs(secrets) do
    if s == value then return value end
  end
  secrets[#secrets + 1] = value
  table.sort(secrets, function(a, b) return #a > #b end)
  return value
end

--- log.add_mask(pattern [, replacement [, raw]]) : a Lua pattern whose matches are replaced
--- (by *** unless replacement is given; with raw, replacement is a gsub replacement that
--- may use %1..%9 for the pattern's captures)
function log.add_mask(pattern, replacement, raw)
  assert(type(pattern) == "string", "log.add_mask: pattern must be a string")
  local ok, err = pcall(string.find, "", pattern)
  if not ok then error("log.add_mask: bad pattern '" .. pattern .. "': " .. tostring(err), 2) end
  for _, m in ipairs(masks) do
    if m[1] == pattern then return end
  end
  local r = tostring(replacement or REDACTED)
  if not raw then r = r:gsub("%%", "%%%%") end
  masks[#masks + 1] = {pattern, r}
end

local function replace_plain(s, needle)
  local out, i = {}, 1
  while true do
    local a, b = s:find(needle, i, true)
    if not a then break end
    out[#out + 1] = s:sub(i, a - 1)
    out[#out + 1] = REDACTED
    i = b + 1
  end
  if i == 1 then return s end
  out[#out + 1] = s:sub(i)
  return table.concat(out)
end

--- log.redact(s) -> s with every secret and mask replaced by ***
function log.redact(s)
  if type(s) ~= "string" then s = tostring(s) end
  for _, secret in ipairs(secrets) do
    if s:find(secret, 1, true) then s = replace_plain(s, secret) end
  end
  for _, m in ipairs(masks) do
    s = s:gsub(m[1], m[2])
  end
  return s
end

--- log.public_url(url) -> url without the user and password it may carry
--- ("https://u:p@host/x" -> "https://host/x"), for messages, logs and names
function log.public_url(url)
  return (tostring(url):gsub("^(%a[%w+.-]*://)[^/@]*@", "%1"))
end

function log.set_level(name)
  local l = LEVELS[name]
  if not l then error("unknown log level '" .. tostring(name) .. "' (debug, info, warn, error, off)", 2) end
  state.level = l
end

function log.set_format(name)
  if name ~= "text" and name ~= "json" then
    error("unknown log format '" .. tostring(name) .. "' (text or json)", 2)
  end
  state.format = name
end

function log.format() return state.format end

--- log.set_output(file) : where log lines go (default io.stderr)
function log.set_output(f)
  state.out = f
  state.colour = nil
end

local function use_colour()
  if state.colour == nil then
    local nc = sys.getenv("NO_COLOR")
    state.colour = state.out == io.stderr and sys.isatty(2) and (nc == nil or nc == "")
  end
  return state.colour
end

local function field_text(v)
  if type(v) == "string" then
    if v == "" or v:find("[%s\"=]") then return string.format("%q", v) end
    return v
  end
  return tostring(v)
end

-- The time of day in front of each line, formatted once a second (a local time is a
-- time-zone lookup: bursts of lines need not repeat it).
local last_second, last_clock
local function clock()
  local now = os.time()
  if now ~= last_second then
    last_second, last_clock = now, os.date("%H:%M:%S", now)
  end
  return last_clock
end

local TAGS = {}
for name in pairs(LEVELS) do TAGS[name] = string.format("%-5s", name:upper()) end

--- log.valid_utf8(s) -> s with every byte that is not part of a valid UTF-8 character made
--- U+FFFD (as JSON logs need; the text format passes bytes through)
function log.valid_utf8(s)
  local ok, bad = utf8.len(s)
  if ok then return s end
  local out, at = {}, 1
  while bad do
    out[#out + 1] = s:sub(at, bad - 1)
    out[#out + 1] = "\u{FFFD}"
    at = bad + 1
    ok, bad = utf8.len(s, at)
  end
  out[#out + 1] = s:sub(at)
  return table.concat(out)
end

local function emit(level, msg, fields)
  if LEVELS[level] < state.level then return end
  msg = log.redact(msg)
  local line
  if state.format == "json" then
    local rec = {ts = time.iso8601(), level = level, msg = msg}
    if fields then
      for k, v in pairs(fields) do
        if rec[k] == nil then
          local t = type(v)
          rec[k] = (t == "string" and log.redact(v)) or ((t == "number" or t == "boolean") and v) or log.redact(tostring(v))
        end
      end
    end
    line = json.encode(rec)
    if not line then -- a tool's bytes that are not UTF-8 (Latin-1, binary): JSON cannot hold them
      for k, v in pairs(rec) do
        if type(v) == "string" then rec[k] = log.valid_utf8(v) end
      end
      line = json.encode(rec) or json.encode({ts = rec.ts, level = level, msg = log.valid_utf8(msg)})
    end
  else
    local prefix, tail = "", ""
    if fields then
      local keys
      for k in pairs(fields) do
        -- a step's lines read best with the step in front; the stream is noise to a reader
        if k ~= "step" and k ~= "stream" then
          keys = keys or {}
          keys[#keys + 1] = tostring(k)
        end
      end
      if keys then
        table.sort(keys)
        local parts = {}
        for i, k in ipairs(keys) do parts[i] = k .. "=" .. log.redact(field_text(fields[k])) end
        tail = "  " .. table.concat(parts, " ")
      end
      if fields.step ~= nil then prefix = "[" .. log.redact(tostring(fields.step)) .. "] " end
    end
    local tag = TAGS[level]
    if use_colour() then tag = COLOURS[level] .. tag .. "\27[0m" end
    line = clock() .. " " .. tag .. " " .. prefix .. msg .. tail
  end
  state.out:write(line .. "\n") -- one write: stderr is unbuffered
  state.out:flush()
end

--- log.debug/info/warn/error(msg, [fields]) ; msg may be a format with arguments:
--- log.info("deployed %s in %.1fs", env, secs)  or  log.info("deployed", {env = env})
local function logger(level)
  return function(msg, ...)
    local fields
    if select("#", ...) > 0 then
      local first = ...
      if type(first) == "table" and select("#", ...) == 1 then
        fields = first
      else
        msg = string.format(msg, ...)
      end
    end
    emit(level, tostring(msg), fields)
  end
end

for name in pairs(COLOURS) do log[name] = logger(name) end

--- log.enabled(level) -> boolean
function log.enabled(level) return LEVELS[level] >= state.level end

-- log.allow's windows, by key; bounded, as the keys may come from what a server receives
local windows, window_count = {}, 0
local MAX_WINDOWS = 1024

--- log.allow(key, lines, seconds) -> allowed, held : whether a line for `key` may be written
--- now: at most `lines` per key in each window of `seconds`. `held` is how many lines were
--- held back since the last one allowed (give it as a field, so the reader knows).
--- For lines that anyone can cause (a server's answers to bad requests): the log stays
--- readable and the disk safe, while counters (metrics) still count every one.
function log.allow(key, lines, seconds)
  if type(key) ~= "string" then error("log.allow: key must be a string", 2) end
  if math.type(lines) ~= "integer" or lines < 0 then error("log.allow: lines must be a whole number >= 0", 2) end
  if type(seconds) ~= "number" or not (seconds >= 0) then error("log.allow: seconds must be a number >= 0", 2) end
  local now = time.monotonic()
  local w = windows[key]
  if not w then
    if window_count >= MAX_WINDOWS then
      windows, window_count = {}, 0 -- forget old windows rather than grow without end
    end
    w = {start = now, count = 0, held = 0}
    windows[key] = w
    window_count = window_count + 1
  elseif now - w.start >= seconds then
    w.start, w.count = now, 0
  end
  if w.count >= lines then
    w.held = w.held + 1
    return false, w.held
  end
  w.count = w.count + 1
  local held = w.held
  w.held = 0
  return true, held
end

--- log.with(fields) -> a logger that adds these fields to every line
function log.with(base)
  local child = {}
  for name in pairs(COLOURS) do
    local level = LEVELS[name]
    child[name] = function(msg, fields, ...)
      if level < state.level then return end -- nothing to build for a line nobody sees
      if select("#", ...) > 0 or (fields ~= nil and type(fields) ~= "table") then
        msg = string.format(msg, fields, ...)
        fields = nil
      end
      local all = base
      if fields ~= nil and next(fields) ~= nil then
        all = {}
        for k, v in pairs(base) do all[k] = v end
        for k, v in pairs(fields) do all[k] = v end
      end
      emit(name, tostring(msg), all)
    end
  end
  return child
end

return log
