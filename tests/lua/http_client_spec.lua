-- ops.http client: requests against real servers on loopback, started here.
--   fixture: tests/lua/fixtures/http_test_server.py (echo, status, redirect, delay, bytes, drop)
--   static:  python3 -m http.server over a temp directory
local http = require "ops.http"
local cjson = require "cjson"
local monotonic = require("ops.time").monotonic

local FIXTURE = "tests/lua/fixtures/http_test_server.py"

local function run(argv)
  local res = assert(ops.proc.run(argv))
  assert(res.ok, table.concat(argv, " ") .. " failed: " .. tostring(res.stderr))
  return (res.stdout:gsub("%s+$", ""))
end

local function free_port()
  return tonumber(run { "python3", "-c",
    "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])" })
end

local function wait_until_up(url)
  for _ = 1, 200 do
    local res = http.get(url, { timeout = 1 })
    if res then return res end
    ops.sleep(0.05)
  end
  error("server at " .. url .. " did not come up")
end

local function file_size(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local n = f:seek("end")
  f:close()
  return n
end

local function exists(path) return file_size(path) ~= nil end

local function status_kb(field)
  for line in io.lines("/proc/self/status") do
    local v = line:match("^" .. field .. ":%s+(%d+) kB")
    if v then return tonumber(v) end
  end
end

local function assert_fails_with(codes, res, err, code)
  assert.is_nil(res)
  assert.is_string(err)
  if type(codes) == "string" then codes = { codes } end
  local known = {}
  for _, c in ipairs(codes) do known[c] = true end
  assert.is_true(known[code] == true, "got code " .. tostring(code) .. ": " .. tostring(err))
  assert.equals(code .. ": ", err:sub(1, #code + 2))
end

local server, base, static_server, static_base, dir

setup(function()
  dir = run { "mktemp", "-d", "/tmp/http_client_spec-XXXXXX" }
  local port
  server = assert(ops.proc.spawn({ "python3", FIXTURE }, {
    stdout = function(line) port = port or tonumber(line) end,
    stderr = "inherit",
  }))
  for _ = 1, 200 do
    if port then break end
    ops.sleep(0.05)
  end
  assert(port, "the fixture server printed no port")
  base = "http://127.0.0.1:" .. port
  wait_until_up(base .. "/echo")

  local f = assert(io.open(dir .. "/hello.txt", "wb"))
  f:write("hello from http.server\n")
  f:close()
  local sport = free_port()
  static_server = assert(ops.proc.spawn(
    { "python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", dir, tostring(sport) },
    { stdout = "ignore", stderr = "ignore" }))
  static_base = "http://127.0.0.1:" .. sport
  wait_until_up(static_base .. "/")
end)

teardown(function()
  for _, p in ipairs { server, static_server } do
    if p then
      p:kill()
      p:wait()
    end
  end
  if dir then run { "rm", "-rf", dir } end
end)

local function echo(opts)
  opts.url = opts.url or (base .. "/echo")
  local res, err = http.request(opts)
  assert(res, err)
  assert.equals(200, res.status)
  return cjson.decode(res.body), res
end

describe("http.request sends", function()
  it("GET with headers given as a map and as a list, keeping the query", function()
    local got = echo { url = base .. "/echo?a=1&b=two", headers = { ["X-One"] = "1", "X-Two: 2", ["X-Num"] = 3 } }
    assert.equals("GET", got.method)
    assert.equals("a=1&b=two", got.query)
    assert.equals("1", got.headers["x-one"])
    assert.equals("2", got.headers["x-two"])
    assert.equals("3", got.headers["x-num"])
    assert.equals("opsrun/0.1", got.headers["user-agent"])
  end)

  for _, method in ipairs { "POST", "PUT", "PATCH", "DELETE" } do
    it(method .. " with a body and headers", function()
      local body = method .. " body \0 with a NUL"
      local got = echo { method = method, body = body, headers = { ["Content-Type"] = "application/octet-stream" } }
      assert.equals(method, got.method)
      assert.equals(body, got.body)
      assert.equals("application/octet-stream", got.headers["content-type"])
      assert.equals(tostring(#body), got.headers["content-length"])
    end)
  end

  it("DELETE without a body, and any method name", function()
    assert.equals("DELETE", echo({ method = "DELETE" }).method)
    assert.equals("PURGE", echo({ method = "PURGE" }).method)
  end)

  it("HEAD: the status and headers, no body", function()
    local res = assert(http.request { method = "HEAD", url = base .. "/echo" })
    assert.equals(200, res.status)
    assert.equals("", res.body)
  end)

  it("a body streamed from body_file, for POST and PUT", function()
    local path = dir .. "/upload.bin"
    local data = string.rep("0123456789", 300000) -- 3 MB: past libcurl's Expect threshold
    local f = assert(io.open(path, "wb"))
    f:write(data)
    f:close()
    for _, method in ipairs { "POST", "PUT" } do
      local got = echo { method = method, body_file = path }
      assert.equals(method, got.method)
      assert.equals(#data, #got.body)
      assert.is_true(got.body == data)
    end
  end)

  it("basic credentials, a bearer token and a custom user agent", function()
    assert.equals("Basic Ym9iOnMzY3JldA==", echo({ basic = { "bob", "s3cret" } }).headers.authorization)
    assert.equals("Basic Ym9iOnMzY3JldA==", echo({ basic = { user = "bob", password = "s3cret" } }).headers.authorization)
    assert.equals("Bearer tok-123", echo({ bearer = "tok-123" }).headers.authorization)
    assert.equals("deployer/2", echo({ user_agent = "deployer/2" }).headers["user-agent"])
  end)

  it("http.get and http.post", function()
    local res = assert(http.get(base .. "/echo", { headers = { ["X-Get"] = "y" } }))
    assert.equals("y", cjson.decode(res.body).headers["x-get"])
    res = assert(http.post(base .. "/echo", "payload", { headers = { ["Content-Type"] = "text/plain" } }))
    local got = cjson.decode(res.body)
    assert.equals("POST", got.method)
    assert.equals("payload", got.body)
  end)

  it("works against python3 -m http.server", function()
    local res = assert(http.get(static_base .. "/hello.txt"))
    assert.equals(200, res.status)
    assert.equals("hello from http.server\n", res.body)
    assert.equals(404, assert(http.get(static_base .. "/missing")).status)
  end)
end)

describe("a response", function()
  it("has headers looked up case-insensitively, repeated ones joined with ', '", function()
    local res = assert(http.get(base .. "/headers"))
    assert.equals("v", res.headers["x-mixed-case"])
    assert.equals("v", res.headers["X-MIXED-CASE"])
    assert.equals("v", res.headers["X-Mixed-Case"])
    assert.equals("a, b", res.headers["x-multi"])
    assert.equals("text/plain", res.headers["Content-Type"])
    assert.is_nil(res.headers["X-Absent"])
    assert.is_nil(rawget(res.headers, "X-Mixed-Case"))
  end)

  it("carries the status of a non-2xx answer: that is not an error", function()
    local res = assert(http.get(base .. "/status/503"))
    assert.equals(503, res.status)
    assert.equals("status 503", res.body)
    assert.equals(404, assert(http.get(base .. "/nope")).status)
  end)

  it("has the effective URL without userinfo, and a duration", function()
    local res = assert(http.get("http://someone:pw@127.0.0.1:" .. base:match(":(%d+)$") .. "/echo?q=1"))
    assert.equals(base .. "/echo?q=1", res.url)
    assert.is_number(res.duration)
    assert.is_true(res.duration >= 0 and res.duration < 5)
  end)
end)

describe("redirects", function()
  it("are not followed by default", function()
    local res = assert(http.get(base .. "/redirect?to=/echo"))
    assert.equals(302, res.status)
    assert.equals("/echo", res.headers.location)
  end)

  it("are followed with follow_redirects", function()
    local res = assert(http.get(base .. "/redirect?to=/echo", { follow_redirects = true }))
    assert.equals(200, res.status)
    assert.equals(base .. "/echo", res.url)
    assert.equals("GET", cjson.decode(res.body).method)
  end)

  it("stop after 10 hops with EPROTO", function()
    local res, err, code = http.get(base .. "/loop", { follow_redirects = true })
    assert_fails_with("EPROTO", res, err, code)
  end)

  it("never lead to another scheme than http and https", function()
    local res, err, code = http.get(base .. "/redirect?to=file:///etc/passwd", { follow_redirects = true })
    assert_fails_with("EPROTO", res, err, code)
  end)
end)

describe("failures", function()
  it("a total timeout gives 'timeout', naming the host", function()
    local t0 = monotonic()
    local res, err, code = http.get(base .. "/delay?s=5", { timeout = 0.5 })
    assert_fails_with("timeout", res, err, code)
    assert.matches(base .. "/delay", err, 1, true)
    assert.is_true(monotonic() - t0 < 3)
  end)

  it("a port nobody listens on gives ECONNREFUSED", function()
    local res, err, code = http.get("http://127.0.0.1:" .. free_port() .. "/x")
    assert_fails_with("ECONNREFUSED", res, err, code)
    assert.matches("http://127.0.0.1:%d+/x", err)
  end)

  it("https to a plain-http port gives 'tls' (or EIO)", function()
    local res, err, code = http.get(base:gsub("^http:", "https:") .. "/echo")
    assert_fails_with({ "tls", "EIO" }, res, err, code)
  end)

  it("a connection dropped without an answer gives EIO", function()
    assert_fails_with("EIO", http.get(base .. "/drop"))
  end)

  it("a body over max_body gives 'too_large'", function()
    local res, err, code = http.get(base .. "/bytes?n=5000", { max_body = 1000 })
    assert_fails_with("too_large", res, err, code)
    assert.matches("response body over 1000 bytes", err, 1, true)
    assert.equals(5000, #assert(http.get(base .. "/bytes?n=5000", { max_body = 5000 })).body)
  end)

  it("a URL that is not http or https is refused with EPROTO", function()
    for _, url in ipairs { "file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/", "no scheme", "http://" } do
      local res, err, code = http.get(url)
      assert_fails_with("EPROTO", res, err, code)
    end
  end)
end)

describe("credentials", function()
  local secrets = { "urlpass", "urluser", "qsecret", "basicpw", "bearertok", "hdrsecret" }
  local function assert_clean(err)
    assert.is_string(err)
    for _, s in ipairs(secrets) do assert.is_nil(err:find(s, 1, true), "message leaks " .. s .. ": " .. err) end
  end
  local function creds(url, extra)
    local opts = {
      url = url:gsub("^(https?://)", "%1urluser:urlpass@") .. "?token=qsecret",
      basic = { "basicuser", "basicpw" },
      headers = { Authorization = "Bearer hdrsecret" },
    }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return opts
  end

  it("never appear in the message of a refused connection", function()
    local res, err, code = http.request(creds("http://127.0.0.1:" .. free_port() .. "/p"))
    assert_fails_with("ECONNREFUSED", res, err, code)
    assert_clean(err)
    res, err = http.request(creds("http://127.0.0.1:" .. free_port() .. "/p", { bearer = "bearertok" }))
    assert.is_nil(res)
    assert_clean(err)
  end)

  it("never appear in the message of a TLS failure or a timeout", function()
    local res, err = http.request(creds(base:gsub("^http:", "https:") .. "/echo", { bearer = "bearertok" }))
    assert.is_nil(res)
    assert_clean(err)
    res, err = http.request(creds(base .. "/delay", { bearer = "bearertok", timeout = 0.3 }))
    assert.is_nil(res)
    assert_clean(err)
  end)

  it("never appear in the message of a refused scheme", function()
    local res, err = http.request(creds("ftp://127.0.0.1/x", { bearer = "bearertok" }))
    assert.is_nil(res)
    assert_clean(err)
  end)
end)

describe("misuse raises", function()
  it("without a url, with a bad option type, a bad header or method", function()
    assert.has_error(function() http.request {} end)
    assert.has_error(function() http.request() end)
    assert.has_error(function() http.request { url = base, timeout = "soon" } end)
    assert.has_error(function() http.request { url = base, timeout = -1 } end)
    assert.has_error(function() http.request { url = base, headers = "X: y" } end)
    assert.has_error(function() http.request { url = base, headers = { ["X-A"] = "1\r\nX-Injected: 2" } } end)
    assert.has_error(function() http.request { url = base, headers = { "no colon" } } end)
    assert.has_error(function() http.request { url = base, method = "GET /x" } end)
    assert.has_error(function() http.request { url = base, basic = { "only-user" } } end)
    assert.has_error(function() http.request { url = base, body = 42 } end)
  end)

  it("outside a task", function()
    local ok, err = pcall(coroutine.wrap(function() return http.get(base .. "/echo") end))
    assert.is_false(ok)
    assert.matches("must be called from a task", err, 1, true)
  end)
end)

describe("output", function()
  it("streams a 1 GiB body to a file with flat memory", function()
    local path = dir .. "/big.bin"
    local rss_before = status_kb("VmRSS")
    local reset = io.open("/proc/self/clear_refs", "w") -- "5" resets VmHWM to the current RSS
    if reset then
      reset:write("5")
      reset:close()
    end
    local n = 1024 * 1024 * 1024
    local res, err = http.get(base .. "/bytes?n=" .. n, { output = path, timeout = 120 })
    assert(res, err)
    assert.equals(200, res.status)
    assert.is_nil(res.body)
    assert.equals(n, file_size(path))
    assert.is_false(exists(path .. ".part"))
    local hwm = status_kb("VmHWM")
    print(string.format("\n1 GiB download: %.2f s, RSS before %d kB, peak %d kB (%+d kB)",
      res.duration, rss_before, hwm, hwm - rss_before))
    assert.is_true(hwm - rss_before < 64 * 1024, "memory grew by " .. (hwm - rss_before) .. " kB")
    os.remove(path)
  end)

  it("saves a file from python3 -m http.server, replacing the old one only on success", function()
    local path = dir .. "/saved.txt"
    local f = assert(io.open(path, "wb"))
    f:write("old")
    f:close()
    local res = assert(http.get(static_base .. "/hello.txt", { output = path }))
    assert.equals(200, res.status)
    assert.equals("hello from http.server\n", io.open(path, "rb"):read("a"))
    res = assert(http.get(static_base .. "/missing", { output = path }))
    assert.equals(404, res.status)
    assert.is_string(res.body) -- the error page, for the caller to read
    assert.equals("hello from http.server\n", io.open(path, "rb"):read("a"))
    assert.is_false(exists(path .. ".part"))
  end)

  it("removes the partial file when the transfer fails", function()
    local path = dir .. "/partial.bin"
    local res, err, code = http.get(base .. "/partial?n=200000", { output = path })
    assert_fails_with("EIO", res, err, code)
    assert.is_false(exists(path))
    assert.is_false(exists(path .. ".part"))
  end)

  it("fails with the errno code when the file cannot be written", function()
    local res, err, code = http.get(base .. "/echo", { output = dir .. "/no/such/dir/f" })
    assert_fails_with("ENOENT", res, err, code)
  end)
end)

describe("tasks", function()
  it("many requests from many tasks progress at once", function()
    local tasks = {}
    for i = 1, 20 do
      tasks[i] = ops.spawn(function() return http.get(base .. "/delay?s=0.5&group=many") end)
    end
    for i = 1, 20 do
      local ok, res, err = tasks[i]:wait(30)
      assert.is_true(ok)
      assert(res, err)
      assert.equals(200, res.status)
      assert.equals("ok", res.body)
    end
    local stats = cjson.decode(assert(http.get(base .. "/stats?group=many")).body)
    print(string.format("\nmax requests in flight at the server: %d of 20", stats.max_inflight))
    assert.is_true(stats.max_inflight > 1)
  end)

  it("cancelling a waiting task abandons its request and its partial file", function()
    local path = dir .. "/cancelled.bin"
    local t = ops.spawn(function() return http.get(base .. "/delay?s=3", { output = path }) end)
    ops.sleep(0.2)
    assert.equals("waiting", t:status())
    assert.is_true(exists(path .. ".part"))
    assert.is_true(t:cancel())
    assert.equals("cancelled", t:status())
    assert.is_false(exists(path .. ".part"))
    assert.is_false(exists(path))
    assert.equals(200, assert(http.get(base .. "/echo")).status)
  end)
end)

describe("http.request_retry", function()
  local function count(key) return tonumber(assert(http.get(base .. "/count?key=" .. key)).body) end
  local fast = { attempts = 4, backoff = 0.05, max_backoff = 0.2 }

  it("retries an idempotent request through two 503s", function()
    local res = assert(http.request_retry({ url = base .. "/flaky?key=get&fail=2" }, fast))
    assert.equals(200, res.status)
    assert.equals("ok after 3", res.body)
    assert.equals(3, count("get"))
  end)

  it("does not retry a POST", function()
    local res = assert(http.request_retry({ method = "POST", body = "x", url = base .. "/flaky?key=post&fail=2" }, fast))
    assert.equals(503, res.status)
    assert.equals(1, count("post"))
  end)

  it("retries a POST marked idempotent", function()
    local res = assert(http.request_retry(
      { method = "POST", body = "x", idempotent = true, url = base .. "/flaky?key=idem&fail=1" }, fast))
    assert.equals(200, res.status)
    assert.equals(2, count("idem"))
  end)

  it("returns the last 5xx once attempts run out, and a 4xx at once", function()
    local res = assert(http.request_retry({ url = base .. "/flaky?key=many&fail=10" }, { attempts = 3, backoff = 0.01 }))
    assert.equals(503, res.status)
    assert.equals(3, count("many"))
    assert.equals(404, assert(http.request_retry({ url = base .. "/nope" }, fast)).status)
  end)

  it("retries connection failures, then returns the error", function()
    local t0 = monotonic()
    local res, err, code = http.request_retry({ url = "http://127.0.0.1:" .. free_port() .. "/" }, fast)
    assert_fails_with("ECONNREFUSED", res, err, code)
    assert.is_true(monotonic() - t0 >= 0.05 + 0.1 + 0.2) -- three waits between four attempts
  end)

  it("does not retry a refused scheme", function()
    assert_fails_with("EPROTO", http.request_retry({ url = "file:///etc/passwd" }, fast))
  end)
end)
