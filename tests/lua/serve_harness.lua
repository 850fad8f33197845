-- For the `opsrun serve` specs: a server under test started as a child process, signed
-- deliveries sent with the real curl CLI, git repos made in the test, the store read
-- directly. Used by serve_spec.lua and serve_durability_spec.lua.
local h = require "helpers"
local json = require "ops.json"
local store = require "ops.store"
local crypto = require "ops.crypto"

local H = {}

H.ZERO = string.rep("0", 40)
H.FIXTURES = h.source .. "/tests/lua/fixtures/webhooks"

function H.wait(what, fn, timeout)
  local deadline = ops.time.monotonic() + (timeout or 20)
  while true do
    local v = fn()
    if v then return v end
    if ops.time.monotonic() > deadline then error("timed out waiting for " .. what, 2) end
    ops.sleep(0.05)
  end
end

-- ---- git ----------------------------------------------------------------------------

local GIT_ENV = {GIT_AUTHOR_NAME = "t", GIT_AUTHOR_EMAIL = "t@example.com", GIT_COMMITTER_NAME = "t",
  GIT_COMMITTER_EMAIL = "t@example.com", GIT_CONFIG_NOSYSTEM = "1", HOME = "/tmp"}

function H.git(dir, ...)
  local r = assert(ops.proc.run({"git", "-C", dir, ...}, {env = GIT_ENV}))
  assert(r.ok, "git " .. table.concat({...}, " ") .. ": " .. r.stderr)
  return (r.stdout:gsub("%s+$", ""))
end

--- a repo with branch main; H.commit(repo, {path = content | false}, msg) -> sha
function H.repo(dir)
  assert(ops.proc.run({"git", "init", "-q", "-b", "main", dir}, {env = GIT_ENV}).ok)
  return dir
end

function H.commit(dir, files, msg)
  for path, content in pairs(files) do
    local full = dir .. "/" .. path
    if content == false then
      H.git(dir, "rm", "-q", "-r", "--", path)
    else
      assert(ops.fs.mkdir_p(ops.fs.dirname(full)))
      h.write(full, content, path:match("%.sh$") and "0755" or nil)
      H.git(dir, "add", "--", path)
    end
  end
  H.git(dir, "commit", "-q", "--allow-empty", "-m", msg or "change")
  return H.git(dir, "rev-parse", "HEAD")
end

-- ---- deliveries ---------------------------------------------------------------------

--- a GitHub push payload (commits: the hint list, may be truncated or empty)
function H.push_body(ref, before, after, extra)
  local p = {ref = ref, before = before, after = after, repository = {full_name = "acme/ops"},
    commits = json.array({})}
  for k, v in pairs(extra or {}) do p[k] = v end
  return json.encode(p)
end

function H.sign(secret, body) return "sha256=" .. crypto.hmac_sha256(secret, body) end

--- curl(args) -> status, body : the real curl CLI; the body goes through a file
function H.curl(args, body)
  local tmp <close> = assert(ops.fs.tempdir("opsrun-serve-curl-"))
  local argv = {"curl", "-s", "--max-time", "30", "-o", tmp.path .. "/out", "-w", "%{http_code}"}
  if body then
    h.write(tmp.path .. "/body", body)
    argv[#argv + 1] = "--data-binary"
    argv[#argv + 1] = "@" .. tmp.path .. "/body"
  end
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local r = assert(ops.proc.run(argv))
  return tonumber(r.stdout), h.read(tmp.path .. "/out") or ""
end

--- post(url, body, headers) -> status, decoded JSON answer (or the raw text)
function H.post(url, body, headers)
  local args = {"-X", "POST", "-H", "Content-Type: application/json"}
  for k, v in pairs(headers or {}) do
    args[#args + 1] = "-H"
    args[#args + 1] = k .. ": " .. v
  end
  args[#args + 1] = url
  local status, text = H.curl(args, body)
  return status, json.decode(text) or text
end

function H.github(url, secret, body, delivery, event)
  return H.post(url, body, {["X-GitHub-Event"] = event or "push", ["X-GitHub-Delivery"] = delivery,
    ["X-Hub-Signature-256"] = H.sign(secret, body)})
end

-- ---- the server under test ----------------------------------------------------------

local started = {}

--- H.reap() : kills the servers still running (a test that failed before stopping its
--- own): each spec file that starts servers calls it in its teardown
function H.reap()
  for _, srv in ipairs(started) do
    if h.alive(srv.proc.pid) then
      srv.proc:kill("SIGKILL")
      srv.proc:wait()
    end
  end
  started = {}
end

--- H.server(dir, config_yaml, env) -> srv : starts `opsrun serve --config dir/serve.yaml`
--- srv.url, srv.lines (its log), srv:stop(signal) -> result, srv.store
function H.server(dir, cfg_text, env)
  local cfg = dir .. "/serve.yaml"
  if cfg_text then h.write(cfg, cfg_text) end
  local srv = {dir = dir, config = cfg, lines = {}, env = env, store = dir .. "/state/opsrun.db"}
  local child_env = {OPSRUN_STORE = srv.store, NO_COLOR = "1"}
  for k, v in pairs(env or {}) do child_env[k] = v end
  local function keep(line) srv.lines[#srv.lines + 1] = line end
  srv.proc = assert(ops.proc.spawn({h.opsrun, "serve", "--config", cfg, "--listen", "127.0.0.1:0"},
    {cwd = dir, env = child_env, stdout = keep, stderr = keep}))
  started[#started + 1] = srv
  srv.address = H.wait("the server to listen", function()
    for _, l in ipairs(srv.lines) do
      local a = l:match("listening on (%S+)")
      if a then return a end
    end
    if not h.alive(srv.proc.pid) then error("opsrun serve exited:\n" .. table.concat(srv.lines, "\n")) end
  end)
  srv.url = "http://" .. srv.address
  function srv.hook(name) return srv.url .. "/hooks/" .. name end
  function srv.log() return table.concat(srv.lines, "\n") end
  function srv.kill(sig) srv.proc:kill(sig) end
  function srv.stop(sig)
    srv.proc:kill(sig or "SIGTERM")
    return srv.proc:wait()
  end
  return srv
end

--- the store, opened read-mostly by the test (WAL: alongside the server)
function H.query(path, sql, ...)
  local db <close> = assert(store.open(path))
  return assert(db:query(sql, ...))
end

function H.queue_counts(path)
  local counts = {ready = 0, leased = 0, done = 0, dead = 0}
  for _, r in ipairs(H.query(path, "SELECT state, count(*) AS n FROM ops_queue WHERE queue = 'deliveries' GROUP BY state")) do
    counts[r.state] = r.n
  end
  return counts
end

--- waits until delivery `id` of hook has an outcome; returns its row
function H.outcome(path, delivery, timeout)
  return H.wait("the outcome of delivery " .. delivery, function()
    return H.query(path, "SELECT * FROM serve_outcomes WHERE delivery = ?", delivery)[1]
  end, timeout)
end

function H.metric(srv, pattern)
  local status, text = H.curl({srv.url .. "/metrics"})
  assert(status == 200, "GET /metrics answered " .. tostring(status))
  return tonumber(text:match("\n" .. pattern .. " (%d+)")), text
end

return H
