-- Specification of ops.serve.verify's checks, in process: each check is compared, input by
-- input, with the rule as first written (Lua patterns, kept here as the reference), over
-- every byte in each position that matters and the edge cases of each rule. The receiver's
-- hot path may check more cheaply; it may not accept or refuse anything else.
local crypto = require "ops.crypto"
local json = require "ops.json"
local verify = require "ops.serve.verify"
local serve = require "ops.serve"

-- the rules as written in the first verify.lua
local ref_rule = {}
function ref_rule.valid_ref(ref)
  return not (#ref > 255 or ref:find("%.%.") or ref:find("//", 1, true) or ref:find("/$") or ref:find("/%.")
    or ref:find("%.lock$") or ref:find("@{", 1, true) or ref:find("[%z\1-\32\127~^:?*%[\\]"))
end
function ref_rule.is_sha(s)
  return type(s) == "string" and (#s == 40 or #s == 64) and not s:find("[^0-9a-f]")
end
function ref_rule.valid_id(s)
  return type(s) == "string" and s ~= "" and #s <= 128 and not s:find("[%z\1-\31\127]")
end
function ref_rule.github_signed(secret, body, header)
  local given = (header or ""):match("^sha256=(%x+)$")
  if type(given) ~= "string" or given == "" then return false end
  return crypto.equals(crypto.hmac_sha256(secret, body), given:lower())
end
local ESCAPES = {['"'] = '\\"', ["\\"] = "\\\\"}
function ref_rule.json_string(v)
  return '"' .. v:gsub('[%c"\\]', function(c) return ESCAPES[c] or string.format("\\u%04x", c:byte()) end) .. '"'
end

local function bytes()
  local t = {}
  for b = 0, 255 do t[#t + 1] = string.char(b) end
  return t
end

local function same(name, fn, rule, inputs)
  for _, v in ipairs(inputs) do
    local want = not not rule(v)
    local got = fn(v)
    assert(got == want, string.format("%s(%q): %s, the rule says %s", name, tostring(v), tostring(got), tostring(want)))
  end
end

describe("ops.serve.verify's checks", function()
  it("valid_ref: the same refs as git check-ref-format's rules written as patterns", function()
    local refs = {
      "refs/heads/main", "refs/heads/feature/x-1_2", "refs/tags/v1.2.3", "refs/heads/release/1.2",
      "refs/heads/a..b", "refs/heads/a/.b", "refs/heads/.a", "refs/heads/a.", "refs/heads/a.lock",
      "refs/heads/a.lock/b", "refs/heads/a.lockb", "refs/heads/a@{1}", "refs/heads/a@b", "refs/heads/@",
      "refs/heads/a//b", "refs/heads/a/", "refs/heads//", "refs/", "refs//", "", "/", "refs/heads/a/b/c/d",
      "refs/heads/UPPER-lower_09", "refs/heads/a-", "refs/heads/-a", "refs/heads/a.b.c", "refs/heads/a~1",
      "refs/heads/a^", "refs/heads/a:b", "refs/heads/a?", "refs/heads/a*", "refs/heads/a[b", "refs/heads/a]b",
      "refs/heads/a\\b", "refs/heads/a b", "refs/heads/é", "refs/heads/\255",
      "refs/heads/" .. string.rep("a", 244), "refs/heads/" .. string.rep("a", 245),
      "refs/heads/" .. string.rep("a/", 122) .. "a", "refs/heads/" .. string.rep("a", 240) .. "/",
    }
    -- every byte at the start, inside and at the end of a name, and next to a slash and a dot
    for _, c in ipairs(bytes()) do
      for _, r in ipairs({"refs/heads/" .. c, "refs/heads/a" .. c .. "b", "refs/heads/a" .. c, "refs/heads/a/" .. c .. "b",
          "refs/heads/a" .. c .. "/b", "refs/heads/a." .. c, "refs/heads/a" .. c .. ".b", "refs/heads/x" .. c .. "lock",
          "refs/heads/a@" .. c, "refs/heads/a" .. c .. "{"}) do
        refs[#refs + 1] = r
      end
    end
    same("valid_ref", verify.valid_ref, ref_rule.valid_ref, refs)
  end)

  it("is_sha: 40 or 64 lowercase hex digits, nothing else", function()
    local a40, a64 = string.rep("a", 40), string.rep("0123456789abcdef", 4)
    local inputs = {a40, a64, string.rep("0", 40), string.rep("f", 64), "", "abc", string.rep("a", 39),
      string.rep("a", 41), string.rep("a", 63), string.rep("a", 65), string.rep("A", 40), a40:sub(2) .. "\n",
      " " .. a40:sub(2), a64:upper()}
    for _, c in ipairs(bytes()) do
      inputs[#inputs + 1] = c .. a40:sub(2)
      inputs[#inputs + 1] = a40:sub(2) .. c
      inputs[#inputs + 1] = a64:sub(1, 30) .. c .. a64:sub(32)
    end
    same("is_sha", verify.is_sha, ref_rule.is_sha, inputs)
    same("is_sha", verify.is_sha, ref_rule.is_sha, {false, 42, true, {}})
    assert.is_false(verify.is_sha(nil))
  end)

  it("valid_id: 1 to 128 bytes, none of them a control character", function()
    local inputs = {"", "a", "72d3162e-cc78-11e3-81ab-4c9367dc0958", string.rep("x", 128), string.rep("x", 129),
      "é", "a b", false, 7}
    for _, c in ipairs(bytes()) do
      inputs[#inputs + 1] = c
      inputs[#inputs + 1] = "id-" .. c .. "-1"
      inputs[#inputs + 1] = string.rep("x", 127) .. c
    end
    same("valid_id", verify.valid_id, ref_rule.valid_id, inputs)
    assert.is_false(verify.valid_id(nil))
  end)

  it("GitHub's signature: accepted exactly when ^sha256=(%x+)$ captures the MAC, in either case", function()
    local secret, body = "It's a Secret to Everybody", '{"ref":"refs/heads/main"}'
    local mac = crypto.hmac_sha256(secret, body)
    local headers = {"sha256=" .. mac, "sha256=" .. mac:upper(), "SHA256=" .. mac, "sha256=", "sha256",
      "sha256=zz", "sha256=" .. mac .. " ", " sha256=" .. mac, "sha256=" .. mac .. "\n", "sha1=" .. mac,
      "sha256=" .. mac:sub(1, -2), "sha256=" .. mac .. "0", "sha256=" .. mac .. "g", "sha256= " .. mac,
      "sha256=" .. mac:sub(1, 31) .. "\0" .. mac:sub(33), "sha256=sha256=" .. mac, "", false}
    for _, c in ipairs(bytes()) do
      headers[#headers + 1] = "sha256=" .. mac:sub(1, 10) .. c .. mac:sub(12)
      headers[#headers + 1] = "sha256" .. c .. mac
    end
    for _, sig in ipairs(headers) do
      local req = {body = body, headers = {["x-github-event"] = "ping", ["x-hub-signature-256"] = sig or nil}}
      local _, status = verify.providers.github({secret = secret}, req)
      local want = ref_rule.github_signed(secret, body, sig or nil) and 200 or 401
      assert(status == want, string.format("X-Hub-Signature-256: %q: %s, the rule says %s", tostring(sig), status, want))
    end
  end)

  it("a push's ref and commit ids: the same answers and reasons", function()
    local secret, a = "s3cret", string.rep("a", 40)
    local function deliver(ref, before, after)
      local body = json.encode({ref = ref, before = before, after = after, commits = json.array({})})
      local req = {body = body, headers = {["x-github-event"] = "push", ["x-github-delivery"] = "d-1",
        ["x-hub-signature-256"] = "sha256=" .. crypto.hmac_sha256(secret, body), ["content-type"] = "application/json"}}
      return verify.providers.github({secret = secret}, req)
    end
    for _, ref in ipairs({"refs/heads/main", "refs/heads/a..b", "refs/heads/a b", "refs/heads/x/", "refs/heads/x.lock",
        "refs/heads/release/1.2", "refs/heads/a//b", "refs/tags/v1"}) do
      local push, status, reason = deliver(ref, a, a)
      if ref_rule.valid_ref(ref) then
        assert.equal(ref, push.ref)
        assert.equal(ref:match("^refs/heads/(.+)$"), push.branch)
      else
        assert.is_nil(push)
        assert.equal(400, status)
        assert.equal("the ref is not a valid git ref name", reason)
      end
    end
    local _, status, reason = deliver("refs/heads/main", a, a:upper())
    assert.equal(400, status)
    assert.equal("before and after must be commit ids (40 or 64 hex digits)", reason)
    local push = deliver("refs/heads/main", string.rep("0", 40), a)
    assert.is_true(push.created)
    assert.is_false(push.deleted)
    push = deliver("refs/heads/main", a, string.rep("0", 64))
    assert.is_false(push.created)
    assert.is_true(push.deleted)
  end)

  it("the stored payload escapes as the rule does: every byte, alone and inside a string", function()
    local keys = {"hook", "delivery", "ref", "before", "after", "created", "deleted", "forced", "received"}
    for _, c in ipairs(bytes()) do
      for _, v in ipairs({c, "a" .. c .. "b", c .. c, string.rep("f", 40) .. c}) do
        local push = {delivery = v, ref = "refs/heads/" .. v, before = v, after = v}
        local got = serve.push_payload(v, push, 1.5)
        local want = '{"hook":' .. ref_rule.json_string(v) .. ',"delivery":' .. ref_rule.json_string(v)
          .. ',"ref":' .. ref_rule.json_string("refs/heads/" .. v) .. ',"before":' .. ref_rule.json_string(v)
          .. ',"after":' .. ref_rule.json_string(v) .. ',"received":1.5}'
        assert(got == want, string.format("%q: %q, the rule gives %q", v, got, want))
        assert.equal('{"delivery":' .. ref_rule.json_string(v) .. "}", serve.flat_json({delivery = v}, keys))
      end
    end
  end)
end)
