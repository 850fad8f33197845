-- A spec helper: moto_server (the AWS API emulator) on a free loopback port, for specs that
-- run the real aws CLI against it.
--   local server = assert(moto.start())   -- or nil, "skipped: aws not found"
--   ops.proc.run({"aws", "s3", "ls"}, {env = server.env})
--   server:stop()                         -- kill, wait; safe to call twice
local fs = require "ops.fs"

local moto = {}

--- moto.which(prog) -> path | nil: prog's path on PATH
function moto.which(prog)
  for dir in (os.getenv("PATH") or ""):gmatch("[^:]+") do
    local path = dir .. "/" .. prog
    if fs.is_executable(path) then return path end
  end
  return nil
end

--- moto.missing() -> nil | "skipped: <prog> not found": why the real-AWS-CLI specs cannot run
function moto.missing()
  for _, prog in ipairs({"aws", "moto_server", "python3"}) do
    if not moto.which(prog) then return "skipped: " .. prog .. " not found" end
  end
  return nil
end

-- A port nothing listens on now (the kernel picks it); a race with another program taking
-- it before moto binds is caught by start, which then tries again.
local function free_port()
  local r = assert(ops.proc.run({"python3", "-c",
    "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"}))
  assert(r.ok, "python3 could not find a free port: " .. tostring(r.stderr))
  return tonumber(r.stdout:match("%d+"))
end

-- true once something answers HTTP on the port
local function answers(port)
  local r = assert(ops.proc.run({"curl", "-s", "-o", "/dev/null", "--max-time", "1",
    "http://127.0.0.1:" .. port .. "/moto-api/"}))
  return r.ok
end

local Server = {}
Server.__index = Server

--- server:stop() -> result of the moto_server process (TERM, then KILL after the grace period)
function Server:stop()
  if not self.result then
    self.handle:kill()
    local ok, res = self.waiter:wait(30)
    assert(ok, "moto_server did not end: " .. tostring(res))
    self.result = res
  end
  return self.result
end

--- moto.start([{timeout = 30}]) -> server | nil, why
-- server.url, server.port, server.pid, server.env (the AWS_* variables that point the aws CLI
-- at it, with throwaway credentials and no user config).
function moto.start(opts)
  local why = moto.missing()
  if why then return nil, why end
  local timeout = opts and opts.timeout or 30
  local last
  for _ = 1, 5 do
    local port = free_port()
    local handle = assert(ops.proc.spawn({"moto_server", "-H", "127.0.0.1", "-p", tostring(port)},
      {stdout = "capture", stderr = "capture", capture_limit = 64 * 1024}))
    local waiter = ops.spawn(function() return handle:wait() end)
    local deadline = ops.time.monotonic() + timeout
    while waiter:status() ~= "done" and ops.time.monotonic() < deadline do
      if answers(port) then
        local url = "http://127.0.0.1:" .. port
        return setmetatable({
          port = port, url = url, pid = handle.pid, handle = handle, waiter = waiter,
          env = {
            AWS_ENDPOINT_URL = url,
            AWS_ACCESS_KEY_ID = "testing",
            AWS_SECRET_ACCESS_KEY = "testing",
            AWS_DEFAULT_REGION = "us-east-1",
            AWS_SESSION_TOKEN = false, AWS_PROFILE = false, AWS_REGION = false,
            AWS_CONFIG_FILE = "/nonexistent/opsrun-spec/aws-config",
            AWS_SHARED_CREDENTIALS_FILE = "/nonexistent/opsrun-spec/aws-credentials",
            AWS_PAGER = "",
          },
        }, Server)
      end
      ops.sleep(0.1)
    end
    if waiter:status() == "done" then
      local _, res = waiter:wait()
      last = "moto_server exited: " .. tostring(res and (res.stderr or ""):sub(-500))
    else
      handle:kill()
      waiter:wait(30)
      error(string.format("moto_server did not answer on port %d within %ds", port, timeout))
    end
  end
  error(last)
end

return moto
