-- ops.http_server: the HTTP/1.1 server (to become ops.http.serve).
-- Each request runs its handler in a task of its own, so a handler may wait (ops.sleep,
-- proc.run, HTTP requests) while the server goes on answering others.
local core = require "ops.core.http_server"

local http_server = {}

local LIMITS = {
  max_body = "bytes",
  max_header = "bytes",
  header_timeout = "seconds",
  body_timeout = "seconds",
  idle_timeout = "seconds",
  max_connections = "connections",
}

local function check_listen(listen)
  if type(listen) ~= "string" then
    return "opts.listen must be a string such as \"127.0.0.1:8080\", \"[::1]:0\" or \"unix:/run/opsrun.sock\", not a "
      .. type(listen)
  end
  if listen:match("^unix:.") then return nil end
  local host, port = listen:match("^(.*):(%d+)$")
  if not host or host == "" then
    return "opts.listen '" .. listen .. "': expected IP:PORT (\"0.0.0.0:8080\"), [IPv6]:PORT (\"[::1]:0\") or unix:/path"
  end
  if tonumber(port) > 65535 then
    return "opts.listen '" .. listen .. "': the port must be from 0 to 65535 (0 picks a free one)"
  end
  return nil
end

--- http_server.serve(opts) -> server | nil, err, code
-- opts.listen: "127.0.0.1:0", "0.0.0.0:8080", "[::1]:0" or "unix:/path/to.sock"
-- opts.handler: function(req) -> status, headers, body
--   req = {method, path, raw_path, query, headers, body, remote}
-- limits (defaults): max_body (25 MiB), max_header (64 KiB), header_timeout (10 s),
--   body_timeout (30 s), idle_timeout (60 s), max_connections (1024)
-- server.port, server.address, server:close([deadline_seconds]), server:stats()
function http_server.serve(opts)
  if type(opts) ~= "table" then
    error("http.serve: expected an options table {listen = ..., handler = function(req) ... end}, got a "
      .. type(opts), 2)
  end
  for k in pairs(opts) do
    if k ~= "listen" and k ~= "handler" and not LIMITS[k] then
      error(string.format("http.serve: unknown option '%s' (listen, handler, max_body, max_header, "
        .. "header_timeout, body_timeout, idle_timeout, max_connections)", tostring(k)), 2)
    end
  end
  local bad = check_listen(opts.listen)
  if bad then error("http.serve: " .. bad, 2) end
  if type(opts.handler) ~= "function" then
    error("http.serve: opts.handler must be a function(req) -> status, headers, body, not a "
      .. type(opts.handler), 2)
  end
  for k, unit in pairs(LIMITS) do
    local v = opts[k]
    if v ~= nil and (type(v) ~= "number" or v <= 0 or v ~= v) then
      error(string.format("http.serve: opts.%s must be a positive number of %s, not %s", k, unit, tostring(v)), 2)
    end
  end
  if opts.max_connections and math.type(opts.max_connections) ~= "integer" then
    error("http.serve: opts.max_connections must be a whole number", 2)
  end
  return core.serve(opts)
end

return http_server
