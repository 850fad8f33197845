-- ops.http_server (ops.http.serve): an HTTP/1.1 server whose handlers run in tasks.
-- Driven by the real curl CLI and by a raw socket client (fixtures/raw_http_client.py).
local http_server = require "ops.http_server"
local cjson = require "cjson"
local h = require "helpers"

local RAW = "tests/lua/fixtures/raw_http_client.py"

local function echo_handler(req)
  local names = {}
  for k in pairs(req.headers) do names[#names + 1] = k end
  table.sort(names)
  return 200, {["Content-Type"] = "text/plain", ["X-Echo"] = "yes"},
    table.concat({req.method, req.path, req.raw_path, req.query, req.body, table.concat(names, ","),
      req.headers["x-multi"] or "-"}, "|")
end

local function serve(opts)
  opts = opts or {}
  opts.listen = opts.listen or "127.0.0.1:0"
  opts.handler = opts.handler or echo_handler
  local srv, err = http_server.serve(opts)
  assert(srv, err)
  return srv, "http://127.0.0.1:" .. tostring(srv.port)
end

local function curl(args)
  local argv = {"curl", "-s", "--max-time", "20"}
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return assert(ops.proc.run(argv))
end

local function status_of(args)
  local argv = {"-o", "/dev/null", "-w", "%{http_code}"}
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return tonumber(curl(argv).stdout)
end

--- Sends bytes over a raw connection; returns {received, closed, elapsed, send_error}.
local function raw(target, bytes, opts)
  opts = opts or {}
  local argv = {"python3", RAW, "--read-timeout", tostring(opts.read_timeout or 3)}
  if type(target) == "number" then
    argv[#argv + 1] = "--port"
    argv[#argv + 1] = tostring(target)
  else
    argv[#argv + 1] = "--unix"
    argv[#argv + 1] = target
  end
  if opts.interval then
    argv[#argv + 1] = "--interval"
    argv[#argv + 1] = tostring(opts.interval)
  end
  if opts.hang_up then argv[#argv + 1] = "--hang-up" end
  local r = assert(ops.proc.run(argv, {stdin = bytes, timeout = 60}))
  assert(r.ok, r.stderr)
  return cjson.decode(r.stdout)
end

--- The server still answers a normal request.
local function assert_still_serving(url)
  local r = curl({url .. "/still?ok=1"})
  assert.are.equal("GET|/still|/still|ok=1||accept,host,user-agent|-", r.stdout)
end

local function wait_until(pred, seconds)
  local deadline = ops.time.monotonic() + (seconds or 5)
  while not pred() do
    if ops.time.monotonic() > deadline then return false end
    ops.sleep(0.01)
  end
  return true
end

describe("ops.http_server.serve", function()
  describe("requests and responses", function()
    local srv, url
    before_each(function() srv, url = serve() end)
    after_each(function() srv:close(1) end)

    it("answers a GET with the handler's status, headers and body", function()
      local r = curl({"-i", url .. "/hello"})
      assert.matches("^HTTP/1.1 200 OK\r\n", r.stdout)
      assert.matches("\r\n[Cc]ontent%-[Ll]ength: 44\r\n", r.stdout)
      assert.matches("\r\nx%-echo: yes\r\n", r.stdout)
      assert.matches("\r\n\r\nGET|/hello|/hello||", r.stdout)
    end)

    it("gives a POST its body", function()
      local r = assert(ops.proc.run({"curl", "-s", url .. "/submit", "--data-binary", "@-"}, {stdin = "a=1&b=\0two"}))
      assert.are.equal("POST|/submit|/submit||a=1&b=\0two|accept,content-length,content-type,host,user-agent|-", r.stdout)
      local big = string.rep("x", 200000)
      r = assert(ops.proc.run({"curl", "-s", url .. "/big", "--data-binary", "@-"}, {stdin = big}))
      assert.are.equal("POST|/big|/big||" .. big .. "|accept,content-length,content-type,host,user-agent|-", r.stdout)
    end)

    it("decodes the path and keeps the raw path and the query apart", function()
      local r = curl({url .. "/a%20b/c%2Fd?x=1&y=%20z"})
      assert.matches("^GET|/a b/c/d|/a%%20b/c%%2Fd|x=1&y=%%20z|", r.stdout)
    end)

    it("lower-cases header names and joins repeated headers with ', '", function()
      local r = curl({url .. "/h", "-H", "X-Multi: one", "-H", "X-MULTI: two", "-H", "X-Custom-Thing: v"})
      assert.matches("|accept,host,user%-agent,x%-custom%-thing,x%-multi|one, two$", r.stdout)
    end)

    it("gives the client's address as ip:port", function()
      local seen
      srv:close(1)
      srv, url = serve({handler = function(req) seen = req.remote return 204 end})
      assert.are.equal(204, status_of({url .. "/"}))
      assert.matches("^127%.0%.0%.1:%d+$", seen)
    end)

    it("answers requests sent back to back on one connection in order (pipelining)", function()
      local res = raw(srv.port, "GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      local a = res.received:find("GET|/one", 1, true)
      local b = res.received:find("GET|/two", 1, true)
      assert.truthy(a and b and a < b)
      assert.is_true(res.closed)
      assert_still_serving(url)
    end)

    it("serves HTTP/1.0 and gives no host header when the client sent none", function()
      local res = raw(srv.port, "GET /old HTTP/1.0\r\n\r\n")
      assert.matches("^HTTP/1.1 200 ", res.received)
      assert.matches("\r\n\r\nGET|/old|/old|||", res.received)
      assert.is_true(res.closed)
    end)

    it("honours Connection: close", function()
      local res = raw(srv.port, "GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      assert.matches("\r\nConnection: close\r\n", res.received)
      assert.is_true(res.closed)
      assert_still_serving(url)
    end)

    it("keeps a connection alive for 1,000 requests", function()
      local remotes = {}
      srv:close(1)
      srv, url = serve({handler = function(req)
        remotes[req.remote] = true
        return 200, {}, "ok\n"
      end})
      local args = {}
      for i = 1, 1000 do args[#args + 1] = url .. "/r" .. i end
      local r = curl(args)
      assert.are.equal(string.rep("ok\n", 1000), r.stdout)
      local n = 0
      for _ in pairs(remotes) do n = n + 1 end
      assert.are.equal(1, n)
      assert.are.equal(1000, srv:stats().requests)
    end)
  end)

  describe("handlers run in tasks of their own", function()
    it("answers another request while a handler waits", function()
      local events = {}
      local function seen(e)
        for _, v in ipairs(events) do if v == e then return true end end
        return false
      end
      local srv, url = serve({handler = function(req)
        if req.path == "/slow" then
          events[#events + 1] = "slow started"
          wait_until(function() return seen("fast answered") end, 10)
          events[#events + 1] = "slow answered"
          return 200, {}, "slow"
        end
        events[#events + 1] = "fast answered"
        return 200, {}, "fast"
      end})
      local slow = ops.spawn(function() return curl({url .. "/slow"}).stdout end)
      assert.is_true(wait_until(function() return seen("slow started") end))
      assert.are.equal("fast", curl({url .. "/fast"}).stdout)
      local ok, body = slow:wait()
      assert.is_true(ok)
      assert.are.equal("slow", body)
      assert.are.same({"slow started", "fast answered", "slow answered"}, events)
      srv:close(1)
    end)

    it("runs the next request in a task that has answered, and ignores any other wake of a waiting task", function()
      local sched = require "ops.core.sched"
      local tasks, seen = {}, 0
      local srv, url = serve({handler = function(req)
        local t = sched.current()
        if not tasks[t] then seen = seen + 1 end
        tasks[t] = true
        return 200, {}, req.path
      end})
      for i = 1, 5 do assert.are.equal("/r" .. i, curl({url .. "/r" .. i}).stdout) end
      assert.are.equal(1, seen) -- one request after the other: one task served them all
      -- a stray wake (a structure of an earlier request still holding its task) changes nothing
      for t in pairs(tasks) do sched.wake(t, "not a request") end
      ops.sleep(0)
      for i = 6, 8 do assert.are.equal("/r" .. i, curl({url .. "/r" .. i}).stdout) end
      assert.are.equal(1, seen)
      srv:close(1)
    end)
  end)

  describe("handler failures", function()
    local srv, url, logfile
    local log = require "ops.log"
    before_each(function()
      logfile = io.tmpfile()
      log.set_output(logfile)
      srv, url = serve({handler = function(req)
        if req.path == "/boom" then error("the handler blew up") end
        if req.path == "/bad-status" then return 42, {}, "?" end
        if req.path == "/bad-header" then return 200, {["X-Bad"] = "a\r\nInjected: yes"}, "?" end
        if req.path == "/bad-body" then return 200, {}, {} end
        return echo_handler(req)
      end})
    end)
    after_each(function()
      srv:close(1)
      log.set_output(io.stderr)
      logfile:close()
    end)

    local function logged()
      logfile:seek("set")
      return logfile:read("a")
    end

    it("answers 500 with a generic body, logs the error with its traceback, and goes on serving", function()
      local r = curl({"-i", url .. "/boom"})
      assert.matches("^HTTP/1.1 500 ", r.stdout)
      assert.matches("\r\n\r\ninternal server error\n$", r.stdout)
      assert.not_matches("blew up", r.stdout)
      local text = logged()
      assert.matches("GET /boom", text)
      assert.matches("the handler blew up", text)
      assert.matches("stack traceback", text)
      assert_still_serving(url)
    end)

    it("answers 500 when the handler returns a status outside 100..599", function()
      assert.are.equal(500, status_of({url .. "/bad-status"}))
      assert.matches("status must be an integer from 100 to 599", logged())
      assert_still_serving(url)
    end)

    it("answers 500 rather than send a header with a line break, or a body that is not a string", function()
      local r = curl({"-i", url .. "/bad-header"})
      assert.matches("^HTTP/1.1 500 ", r.stdout)
      assert.not_matches("Injected", r.stdout)
      assert.are.equal(500, status_of({url .. "/bad-body"}))
      assert_still_serving(url)
    end)
  end)

  describe("limits", function()
    local srv, url
    before_each(function()
      srv, url = serve({max_body = 1000, max_header = 8192, header_timeout = 1, body_timeout = 1})
    end)
    after_each(function() srv:close(1) end)

    it("answers a bad request line with 400 and closes", function()
      local res = raw(srv.port, "THIS IS NOT HTTP\r\n\r\n")
      assert.matches("^HTTP/1.1 400 ", res.received)
      assert.is_true(res.closed)
      assert_still_serving(url)
    end)

    it("answers 100 KB of headers with 431 and closes", function()
      local lines = {"GET / HTTP/1.1\r\nHost: x\r\n"}
      for i = 1, 50 do lines[#lines + 1] = ("X-Filler-%d: %s\r\n"):format(i, string.rep("f", 2000)) end
      lines[#lines + 1] = "\r\n"
      local res = raw(srv.port, table.concat(lines))
      assert.matches("^HTTP/1.1 431 ", res.received)
      assert.is_true(res.closed)
      assert_still_serving(url)
    end)

    it("answers invalid chunked encoding with 400 and closes", function()
      local res = raw(srv.port, "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
      assert.matches("^HTTP/1.1 400 ", res.received)
      assert.is_true(res.closed)
      assert_still_serving(url)
    end)

    it("reads a valid chunked body", function()
      local res = raw(srv.port, "POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .. "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
      assert.matches("POST|/c|/c||hello world|", res.received, 1, true)
    end)

    it("answers a body over max_body with 413, from Content-Length and while reading chunks", function()
      assert.are.equal(413, status_of({url .. "/", "--data-binary", string.rep("b", 2000)}))
      local chunk = string.rep("c", 600)
      local res = raw(srv.port, "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. ("%x\r\n%s\r\n"):format(#chunk, chunk):rep(2) .. "0\r\n\r\n")
      assert.matches("^HTTP/1.1 413 ", res.received)
      assert.is_true(res.closed)
      assert_still_serving(url)
    end)

    it("cuts off a client that sends its header one byte a second", function()
      local res = raw(srv.port, "GET /slowloris HTTP/1.1\r\nHost: x\r\nX-A: " .. string.rep("a", 30) .. "\r\n\r\n",
        {interval = 1, read_timeout = 10})
      assert.is_true(res.closed)
      assert.is_true(res.elapsed < 4, "cut after " .. res.elapsed .. " s")
      assert.not_matches("GET|/slowloris", res.received, 1, true)
      if res.received ~= "" then assert.matches("^HTTP/1.1 408 ", res.received) end
      assert_still_serving(url)
    end)

    it("cuts off a client that stops sending its body", function()
      local res = raw(srv.port, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly a part", {read_timeout = 10})
      assert.is_true(res.closed)
      assert.is_true(res.elapsed < 4, "cut after " .. res.elapsed .. " s")
      assert_still_serving(url)
    end)

    it("survives a client that hangs up in the middle of a body", function()
      local res = raw(srv.port, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\nonly a part", {hang_up = true})
      assert.is_false(res.closed)
      assert_still_serving(url)
      assert.is_true(wait_until(function() return srv:stats().connections == 0 end))
    end)

    it("closes an idle keep-alive connection after idle_timeout", function()
      srv:close(1)
      srv, url = serve({idle_timeout = 0.5})
      local res = raw(srv.port, "GET /idle HTTP/1.1\r\nHost: x\r\n\r\n", {read_timeout = 5})
      assert.matches("GET|/idle", res.received, 1, true)
      assert.is_true(res.closed)
      assert.is_true(res.elapsed < 2.5, "closed after " .. res.elapsed .. " s")
    end)

    it("refuses connections past max_connections", function()
      srv:close(1)
      srv, url = serve({max_connections = 1, header_timeout = 3})
      local holder = ops.spawn(function()
        return raw(srv.port, "GET /held HTTP/1.1\r\nHost: x\r\n", {read_timeout = 5})
      end)
      assert.is_true(wait_until(function() return srv:stats().connections == 1 end))
      local r = assert(ops.proc.run({"curl", "-s", "--max-time", "5", url .. "/refused"}))
      assert.is_false(r.ok)
      holder:wait()
      assert.is_true(wait_until(function() return srv:stats().connections == 0 end))
      assert_still_serving(url)
    end)
  end)

  describe("a client that goes away while its handler runs", function()
    it("drops the response and frees the connection; the handler finishes unharmed", function()
      local finished = false
      local srv, url = serve({handler = function(req)
        if req.path == "/wait" then
          ops.sleep(0.5)
          finished = true
          return 200, {}, "too late"
        end
        return echo_handler(req)
      end})
      raw(srv.port, "GET /wait HTTP/1.1\r\nHost: x\r\n\r\n", {hang_up = true})
      assert.is_true(wait_until(function() return srv:stats().in_flight == 1 end))
      assert.is_true(wait_until(function() return finished end))
      assert.is_true(wait_until(function() return srv:stats().in_flight == 0 and srv:stats().connections == 0 end))
      assert_still_serving(url)
      srv:close(1)
    end)
  end)

  describe("listening", function()
    it("binds port 0 to a free port and says which", function()
      local srv = serve()
      assert.is_true(srv.port > 0)
      assert.are.equal("127.0.0.1:" .. srv.port, srv.address)
      srv:close(1)
    end)

    it("listens on IPv6 loopback", function()
      local srv, err, code = http_server.serve({listen = "[::1]:0", handler = echo_handler})
      if not srv and code == "EADDRNOTAVAIL" then return end -- no IPv6 here
      assert(srv, err)
      assert.are.equal("[::1]:" .. srv.port, srv.address)
      local r = curl({"-g", "http://[::1]:" .. srv.port .. "/v6"})
      assert.matches("^GET|/v6|", r.stdout)
      srv:close(1)
    end)

    it("listens on a unix socket, replacing a stale socket file but nothing else", function()
      local dir = h.tmpdir()
      local path = dir .. "/opsrun.sock"
      local srv = assert(http_server.serve({listen = "unix:" .. path, handler = echo_handler}))
      assert.are.equal("unix:" .. path, srv.address)
      assert.is_nil(srv.port)
      local r = curl({"--unix-socket", path, "http://localhost/over-unix"})
      assert.matches("^GET|/over%-unix|", r.stdout)
      local res = raw(path, "GET /raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      assert.matches("GET|/raw", res.received, 1, true)
      -- a second server cannot take the socket of a live one
      local again, err, code = http_server.serve({listen = "unix:" .. path, handler = echo_handler})
      assert.is_nil(again)
      assert.are.equal("EADDRINUSE", code)
      assert.matches(path, err, 1, true)
      srv:close(1)
      -- a stale socket file is replaced
      assert(ops.proc.run({"python3", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])", path}))
      srv = assert(http_server.serve({listen = "unix:" .. path, handler = echo_handler}))
      assert.matches("^GET|/again|", curl({"--unix-socket", path, "http://localhost/again"}).stdout)
      srv:close(1)
      -- a regular file is not
      h.write(path, "precious")
      again, err, code = http_server.serve({listen = "unix:" .. path, handler = echo_handler})
      assert.is_nil(again)
      assert.are.equal("EADDRINUSE", code)
      assert.matches("not a socket", err)
      assert.are.equal("precious", h.read(path))
      h.rmtree(dir)
    end)

    it("returns nil, err, code when the address is taken", function()
      local srv = serve()
      local again, err, code = http_server.serve({listen = "127.0.0.1:" .. srv.port, handler = echo_handler})
      assert.is_nil(again)
      assert.are.equal("EADDRINUSE", code)
      assert.matches("127.0.0.1:" .. srv.port, err, 1, true)
      srv:close(1)
    end)

    it("raises on misuse with a message that says what to write", function()
      assert.has_error(function() http_server.serve() end)
      assert.has_error(function() http_server.serve({listen = "127.0.0.1:0"}) end,
        "http.serve: opts.handler must be a function(req) -> status, headers, body, not a nil")
      assert.has_error(function() http_server.serve({listen = "localhost", handler = print}) end)
      assert.has_error(function() http_server.serve({listen = "127.0.0.1:0", handler = print, max_bdy = 1}) end)
      assert.has_error(function() http_server.serve({listen = "127.0.0.1:0", handler = print, max_body = -1}) end)
    end)
  end)

  describe("server:close", function()
    it("stops accepting, lets the request in flight finish, then returns", function()
      local srv, url = serve({handler = function()
        ops.sleep(0.5)
        return 200, {}, "finished"
      end})
      local client = ops.spawn(function() return curl({"-i", url .. "/"}).stdout end)
      assert.is_true(wait_until(function() return srv:stats().in_flight == 1 end))
      assert.is_true(srv:close(5))
      local _, out = client:wait()
      assert.matches("^HTTP/1.1 200 ", out)
      assert.matches("\r\nConnection: close\r\n", out)
      assert.matches("finished$", out)
      assert.are.same({connections = 0, requests = 1, in_flight = 0}, srv:stats())
      local r = assert(ops.proc.run({"curl", "-s", url .. "/"}))
      assert.are.equal(7, r.code) -- connection refused
    end)

    it("answers 503 for what is still running at the deadline", function()
      local srv, url = serve({handler = function()
        ops.sleep(3)
        return 200, {}, "too late"
      end})
      local client = ops.spawn(function() return status_of({url .. "/"}) end)
      assert.is_true(wait_until(function() return srv:stats().in_flight == 1 end))
      local t0 = ops.time.monotonic()
      srv:close(0.3)
      assert.is_true(ops.time.monotonic() - t0 < 2)
      local _, status = client:wait()
      assert.are.equal(503, status)
    end)

    it("closes idle keep-alive connections at once", function()
      local srv = serve()
      local client = ops.spawn(function()
        return raw(srv.port, "GET /ka HTTP/1.1\r\nHost: x\r\n\r\n", {read_timeout = 10})
      end)
      assert.is_true(wait_until(function() return srv:stats().requests == 1 and srv:stats().in_flight == 0 end))
      local t0 = ops.time.monotonic()
      srv:close(5)
      assert.is_true(ops.time.monotonic() - t0 < 1)
      local _, res = client:wait()
      assert.is_true(res.closed)
      assert.is_true(res.elapsed < 5)
    end)

    it("may be called again, and stats still read after it", function()
      local srv = serve()
      assert.is_true(srv:close())
      assert.is_true(srv:close())
      assert.are.equal(0, srv:stats().connections)
      assert.matches("closed", tostring(srv))
    end)
  end)
end)
