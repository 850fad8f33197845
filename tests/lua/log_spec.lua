-- ops.log: readable text or JSON lines on stderr, secrets never shown.
local h = require "helpers"

local function run(code, env)
  return h.run_opsrun({"-e", code}, {env = env})
end

describe("ops.log", function()
  it("lets a limited number of lines through per key and window, and counts the rest", function()
    local r = run([[
      local log = require "ops.log"
      local seen = {}
      for i = 1, 25 do
        local ok, held = log.allow("bad:" .. (i % 2), 3, 0.2)
        if ok then seen[#seen + 1] = (i % 2) .. ":" .. held end
      end
      ops.sleep(0.25) -- a new window: the next line says how many were held back
      local ok, held = log.allow("bad:1", 3, 0.2)
      seen[#seen + 1] = tostring(ok) .. ":" .. held
      ok, held = log.allow("bad:1", 3, 0.2)
      seen[#seen + 1] = tostring(ok) .. ":" .. held
      -- many keys (a flood of distinct ones) do not grow without end
      for i = 1, 5000 do assert(log.allow("k" .. i, 1, 60)) end
      for _, bad in ipairs({{nil, 1, 1}, {"k", 1.5, 1}, {"k", -1, 1}, {"k", 1, 0 / 0}, {"k", 1, "60"}}) do
        assert(not pcall(log.allow, bad[1], bad[2], bad[3]), "accepted bad arguments")
      end
      print(table.concat(seen, " "))
    ]])
    assert.are.equal(0, r.code, r.stderr)
    -- 3 of each key in the first window; 10 of key 1 held back; then counted from zero
    assert.are.equal("1:0 0:0 1:0 0:0 1:0 0:0 true:10 true:0\n", r.stdout)
  end)

  it("writes readable lines with level, message and sorted fields to stderr", function()
    local r = run([[ops.log.info("deployed %s", "prod"); ops.log.warn("slow", {step = "helm", secs = 3})]],
      {NO_COLOR = "1"})
    assert.are.equal("", r.stdout)
    assert.matches("^%d%d:%d%d:%d%d INFO  deployed prod\n", r.stderr)
    assert.matches("WARN  %[helm%] slow  secs=3\n", r.stderr)
  end)

  it("puts a step in front of its line and leaves the stream out of text", function()
    local r = run([[ops.log.info("Initializing", {step = "prod/terraform", stream = "stderr", n = 1})]], {NO_COLOR = "1"})
    assert.matches("INFO  %[prod/terraform%] Initializing  n=1\n$", r.stderr)
  end)

  it("has no colour when the output is not a terminal", function()
    local r = run([[ops.log.error("bad")]])
    assert.is_nil(r.stderr:find("\27[", 1, true))
  end)

  it("writes JSON lines with OPSRUN_LOG_FORMAT=json or --log-format json", function()
    local r = run([[ops.log.info("hello", {n = 2, env = "dev"})]], {OPSRUN_LOG_FORMAT = "json"})
    local rec = require("cjson").decode(r.stderr)
    assert.are.equal("info", rec.level)
    assert.are.equal("hello", rec.msg)
    assert.are.equal(2, rec.n)
    assert.are.equal("dev", rec.env)
    assert.matches("^%d+%-%d+%-%d+T", rec.ts)
    r = h.run_opsrun({"--log-format", "json", "-e", [[ops.log.warn("x")]]})
    assert.are.equal("warn", require("cjson").decode(r.stderr).level)
  end)

  it("writes valid JSON for text that is not UTF-8, each bad byte as U+FFFD (the text format keeps the bytes)", function()
    local code = [[ops.log.info("bad \255\254 sur \237\160\128 ok \195\169", {step = "dev/x\255"})]]
    local r = run(code, {OPSRUN_LOG_FORMAT = "json"})
    assert.are.equal("", r.stdout)
    local rec = require("cjson").decode(r.stderr)
    assert.are.equal("bad \u{FFFD}\u{FFFD} sur \u{FFFD}\u{FFFD}\u{FFFD} ok \195\169", rec.msg)
    assert.are.equal("dev/x\u{FFFD}", rec.step)
    r = run(code, {OPSRUN_LOG_FORMAT = "text", NO_COLOR = "1"})
    assert.matches("[dev/x\255] bad \255\254 sur \237\160\128 ok \195\169\n", r.stderr, 1, true)
  end)

  it("drops lines below the level", function()
    local r = run([[ops.log.debug("hidden"); ops.log.info("shown")]])
    assert.is_nil(r.stderr:find("hidden", 1, true))
    r = h.run_opsrun({"--log-level", "debug", "-e", [[ops.log.debug("now shown")]]})
    assert.matches("now shown", r.stderr)
  end)

  it("redacts registered secrets from messages and fields, in both formats", function()
    for _, fmt in ipairs({"text", "json"}) do
      local r = run([[
        local token = ops.secret("s3cr3t-t0ken")
        ops.log.info("calling with " .. token, {auth = "Bearer " .. token})
        ops.log.error("failed: %s", "s3cr3t-t0ken!")
      ]], {OPSRUN_LOG_FORMAT = fmt})
      assert.is_nil(r.stderr:find("s3cr3t", 1, true), fmt)
      assert.matches("calling with %*%*%*", r.stderr)
      assert.matches("failed: %*%*%*!", r.stderr)
    end
  end)

  it("redacts a secret that contains another one completely", function()
    local log = require "ops.log"
    log.secret("abcdef")
    log.secret("xxabcdefxx")
    assert.are.equal("[***] [***]", log.redact("[xxabcdefxx] [abcdef]"))
  end)

  it("redacts masks given as Lua patterns", function()
    local log = require "ops.log"
    log.add_mask("AKIA%u+")
    assert.are.equal("key=*** ok", log.redact("key=AKIAABCDEFGH ok"))
    assert.has_error(function() log.add_mask("[unclosed") end)
  end)

  it("shows a URL without the credentials it carries", function()
    local log = require "ops.log"
    assert.are.equal("https://git.example/acme/ops.git", log.public_url("https://bot:s3cret@git.example/acme/ops.git"))
    assert.are.equal("https://git.example/x", log.public_url("https://git.example/x"))
    assert.are.equal("git@github.com:acme/ops.git", log.public_url("git@github.com:acme/ops.git"))
  end)
end)

describe("ops.time.stamp", function()
  it("writes a time to the second, and - for none", function()
    assert.are.equal("2026-11-23 23:26:08", ops.time.stamp(1795476368.9))
    assert.are.equal("-", ops.time.stamp(nil))
  end)
end)
