-- ops.core.json_select: simdjson parses the text whole and only the parts a spec names
-- become Lua values. Whatever it accepts, lua-cjson (the decoder it stands in for, in the
-- receiver) must accept and read the same way: each case below is checked against it.
local h = require "helpers"
local json = require "ops.json"
local verify = require "ops.serve.verify"
local select = require("ops.core.json_select").select
local cjson_decode = verify.decode_json -- lua-cjson, numbers as floats, depth 512

-- The spec's reading of a value lua-cjson decoded: the reference select must match.
local function project(v, spec)
  if type(spec) ~= "table" or type(v) ~= "table" then return v end
  local each = rawget(spec, "[]")
  local is_array = #v > 0 or next(v) == nil
  if each ~= nil then
    if not is_array then return v end
    local out = {}
    for i, e in ipairs(v) do out[i] = project(e, each) end
    return out
  end
  if is_array and next(v) ~= nil then return v end -- an array under an object spec: whole
  local out = {}
  for k, sub in pairs(spec) do
    if type(k) == "string" and v[k] ~= nil then out[k] = project(v[k], sub) end
  end
  return out
end

-- select's answer for text under spec, which lua-cjson must agree with
local function agree(text, spec)
  local got, err = select(text, spec)
  assert(got ~= nil, "json_select refused it: " .. tostring(err))
  local ok, decoded = pcall(cjson_decode, text)
  assert(ok, "lua-cjson refused what json_select accepted: " .. tostring(decoded))
  assert.same(project(decoded, spec), got)
  return got
end

local FIXTURES = {
  "github/octokit-push-payload.json", "github/octokit-push-with-new-branch.payload.json",
  "github/octokit-push-with-no-username-committer.payload.json", "github/octokit-push-with-organization.payload.json",
  "github/goplayground-push.json", "github/goplayground-ping.json", "github/octokit-ping-payload.json",
  "gitlab/push-event.json", "gitea/push-event.json",
}

describe("ops.core.json_select", function()
  it("reads of every recorded payload what a push needs, as lua-cjson does, and all of it on request", function()
    for _, name in ipairs(FIXTURES) do
      local text = assert(h.read(h.source .. "/tests/lua/fixtures/webhooks/" .. name), name)
      local p = agree(text, verify.PUSH_FIELDS)
      agree(text, true)
      -- nothing else is made
      for k in pairs(p) do assert.is_not_nil(verify.PUSH_FIELDS[k], name .. ": " .. k) end
    end
    local p = select(assert(h.read(h.source .. "/tests/lua/fixtures/webhooks/github/goplayground-push.json")),
      verify.PUSH_FIELDS)
    assert.equal("refs/heads/master", p.ref)
    assert.equal("binkkatal/sample_app", p.repository.full_name)
    assert.same({"app/controllers/application_controller.rb"}, p.commits[1].modified)
    assert.is_nil(p.commits[1].message)
    assert.is_nil(p.pusher)
  end)

  it("keeps a repeated key's last value, makes a value whole when it is not what the spec expects", function()
    local spec = {a = true, o = {x = true}, l = {["[]"] = {y = true}}}
    assert.same({a = 2}, agree('{"a": 1, "a": 2, "b": 3}', spec))
    assert.same({o = {x = "last"}}, agree('{"o": {"x": "first", "x": "last", "z": 1}}', spec))
    -- an object where an array is expected, and the reverse, a string for an object
    assert.same({l = {y = 1, z = 2}}, agree('{"l": {"y": 1, "z": 2}}', spec))
    assert.same({o = {1, 2}}, agree('{"o": [1, 2]}', spec))
    assert.same({o = "text", l = {{y = true}, {}, "s", 4}}, agree('{"o": "text", "l": [{"y": true, "q": 0}, {}, "s", 4]}', spec))
    -- the root itself: an array or a scalar under an object spec
    assert.same({1, 2}, agree("[1, 2]", spec))
    assert.equal("s", agree('"s"', spec))
    assert.equal(json.null, agree("null", spec))
    assert.is_false(agree("false", spec))
  end)

  it("reads strings, numbers and nulls as lua-cjson does", function()
    local text = [[{"s": "a\u0000b\n\u00e9\ud83d\ude00", "i": 9007199254740993, "n": -0, "f": 1.5e300,
      "big": 18446744073709551615, "neg": -9223372036854775808, "e": 1E-7, "z": null, "t": true, "u": []}]]
    local v = agree(text, true)
    assert.equal("a\0b\n\195\169\240\159\152\128", v.s)
    assert.equal("float", math.type(v.i))
    assert.equal(json.null, v.z)
    assert.same({}, v.u)
  end)

  it("refuses with simdjson's reason what it cannot read, and lets lua-cjson decide", function()
    local cases = {
      "", "   ", "{", '{"a":', '{"a" 1}', "[1,]", "01", "NaN", "Infinity", "-", '"\\x"', "[] []",
      '"\255"', '{"a": "\192\128"}', -- not UTF-8 (lua-cjson takes the bytes as they are)
      '"a\1b"',                     -- a raw control character in a string
      "1e400", "18446744073709551616", -- out of range (lua-cjson: inf and a float)
      string.rep("[", 501) .. string.rep("]", 501), -- deeper than MAX_DEPTH (lua-cjson's limit is 512)
    }
    for _, text in ipairs(cases) do
      local v, err = select(text, true)
      assert.is_nil(v, text)
      assert.is_string(err)
      assert.is_true(#err > 0)
    end
    -- as deep as it goes
    local nested = select(string.rep("[", 500) .. string.rep("]", 500), true)
    for _ = 1, 499 do nested = nested[1] end
    assert.same({}, nested)
  end)

  it("reads a body far larger than a push, and a large one again after it", function()
    local commits = {}
    for i = 1, 40000 do
      commits[i] = string.format('{"id": "%040x", "added": ["dir/f%d.txt"], "message": "%s"}', i, i, string.rep("m", 50))
    end
    local text = '{"ref": "refs/heads/main", "commits": [' .. table.concat(commits, ",") .. "]}"
    assert.is_true(#text > 4 * 1024 * 1024) -- past the size after which the parser shrinks back
    local p = agree(text, verify.PUSH_FIELDS)
    assert.equal(40000, #p.commits)
    assert.same({"dir/f40000.txt"}, p.commits[40000].added)
    assert.is_nil(p.commits[1].message)
    agree('{"ref": "x"}', verify.PUSH_FIELDS) -- the parser grew; a small one after it
    assert.equal(40000, #agree(text, verify.PUSH_FIELDS).commits) -- and a large one again
  end)

  it("runs no Lua code of the spec's, and refuses to run inside itself (from a finalizer)", function()
    local touched = false
    local spec = setmetatable({ref = true}, {__index = function() touched = true end})
    assert.same({ref = "r"}, agree('{"ref": "r", "x": [1]}', spec))
    assert.is_false(touched)
    -- a spec that holds itself follows the document down, and no further
    local deep_spec = {}
    deep_spec.x = deep_spec
    local doc = string.rep('{"x": ', 400) .. '{"y": 1}' .. string.rep("}", 400)
    local v = agree(doc, deep_spec)
    for _ = 1, 400 do v = v.x end
    assert.same({}, v) -- y was not asked for
    -- finalizers that select, run by the collector while a select makes its values
    local answers = {}
    local big = "[" .. string.rep('{"a": "' .. string.rep("x", 40) .. '"},', 20000) .. "1]"
    collectgarbage("incremental", 10, 400) -- a collection at every few allocations
    for _ = 1, 2000 do
      setmetatable({}, {__gc = function()
        local v, err = select('{"a": 1}', true)
        answers[#answers + 1] = v and "value" or err
      end})
    end
    local v = select(big, true)
    collectgarbage("incremental", 200, 100)
    collectgarbage()
    assert.equal(20001, #v)
    assert.is_true(#answers > 0)
    for _, a in ipairs(answers) do
      assert.is_true(a == "value" or a == "json_select: a select is already running", a)
    end
  end)

  it("agrees with lua-cjson on every mangled payload it accepts (seeded: the same 3,000 each run)", function()
    local texts = {}
    for i, name in ipairs(FIXTURES) do
      texts[i] = assert(h.read(h.source .. "/tests/lua/fixtures/webhooks/" .. name))
    end
    local BYTES = {'"', "\\", "{", "}", "[", "]", ",", ":", "0", "-", "e", ".", "\0", "\31", "\127", "\192",
      "\237\160\128", "\\u", "\\ud800", "\\u0000", "true", "null", " ", "\n", "1e999", "99999999999999999999"}
    local rng = {state = 12345}
    local function rand(n) -- a small LCG: the same cases on every machine
      rng.state = (rng.state * 1103515245 + 12345) % 2147483648
      return rng.state % n + 1
    end
    local accepted, refused = 0, 0
    for _ = 1, 3000 do
      local t = texts[rand(#texts)]
      for _ = 1, rand(4) do
        if #t == 0 then break end
        local at, kind = rand(#t), rand(7)
        if kind >= 5 then -- what keeps it JSON: a letter for a letter or an escape, a key again
          local c = t:sub(at, at)
          if kind == 7 then
            local KEYS = {'"ref": "refs/heads/x", ', '"commits": {"id": 1}, ', '"repository": [1], ',
              '"before": null, ', '"commits": [{"added": ["a", 2]}, 3], ', '"forced": "yes", '}
            t = t:gsub("^%s*{", "{" .. KEYS[rand(#KEYS)], 1)
          elseif c:match("%a") then
            local SAFE = {"q", "Z", "\\n", "\\u00e9", "\\\"", "\\/"}
            t = t:sub(1, at - 1) .. SAFE[rand(#SAFE)] .. t:sub(at + 1)
          end
        elseif kind == 1 then -- a byte replaced
          t = t:sub(1, at - 1) .. BYTES[rand(#BYTES)] .. t:sub(at + 1)
        elseif kind == 2 then -- inserted
          t = t:sub(1, at) .. BYTES[rand(#BYTES)] .. t:sub(at + 1)
        elseif kind == 3 then -- a span removed
          t = t:sub(1, at - 1) .. t:sub(at + rand(40))
        else -- cut short
          t = t:sub(1, at)
        end
      end
      local spec = rand(2) == 1 and verify.PUSH_FIELDS or true
      local got = select(t, spec)
      if got ~= nil then
        accepted = accepted + 1
        local ok, decoded = pcall(cjson_decode, t)
        assert(ok, "lua-cjson refused what json_select accepted: " .. t)
        assert.same(project(decoded, spec), got)
      else
        refused = refused + 1
      end
    end
    -- both kinds were met (a mangling often leaves valid JSON: a digit for a digit, a space)
    assert.is_true(accepted > 100, "accepted " .. accepted)
    assert.is_true(refused > 100, "refused " .. refused)
  end)

  it("raises on misuse", function()
    assert.has_error(function() select(nil, true) end)
    assert.has_error(function() select("{}", "spec") end)
    assert.has_error(function() select("{}") end)
  end)
end)

describe("ops.serve.verify with json_select", function()
  local hook = {secret = "s3cret", branch = "main"}
  local function deliver(body)
    local req = {body = body, headers = {
      ["x-hub-signature-256"] = "sha256=" .. require("ops.crypto").hmac_sha256(hook.secret, body),
      ["x-github-event"] = "push", ["x-github-delivery"] = "d-1"}}
    return verify.providers.github(hook, req)
  end
  local sha = string.rep("a", 40)

  it("reads a push json_select refuses (bytes that are not UTF-8) through lua-cjson, as before", function()
    local body = '{"ref": "refs/heads/main", "before": "' .. sha .. '", "after": "' .. sha
      .. '", "commits": [{"id": "c", "message": "caf\233", "modified": ["a.txt"]}]}'
    assert.is_nil(select(body, verify.PUSH_FIELDS))
    local push = assert(deliver(body))
    assert.equal("main", push.branch)
    assert.same({"a.txt"}, push.commits[1].modified)
  end)

  it("answers 400 with lua-cjson's message for a body neither reads", function()
    local push, status, reason = deliver('{"ref": "refs/heads/main", "before": ')
    assert.is_nil(push)
    assert.equal(400, status)
    assert.matches("^the body is not a JSON object: ", reason)
  end)

  it("still refuses a path out of the repo in a commit, found through json_select", function()
    local body = '{"ref": "refs/heads/main", "before": "' .. sha .. '", "after": "' .. sha
      .. '", "commits": [{"id": "c", "added": ["ok.txt", "../../etc/passwd"]}]}'
    assert.is_not_nil(select(body, verify.PUSH_FIELDS))
    local push, status, reason = deliver(body)
    assert.is_nil(push)
    assert.equal(400, status)
    assert.matches("not a relative path inside the repo", reason)
  end)
end)
