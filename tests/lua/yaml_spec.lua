-- ops.yaml: what a YAML document means in Lua, and back.
local yaml = require "ops.yaml"
local null = yaml.null

local function load(text)
  local v, err, code = yaml.load(text)
  assert(err == nil, err)
  assert(code == nil)
  return v
end

-- Loads "v: <scalar>" and returns the value of v.
local function scalar(text) return load("v: " .. text).v end

local function fails(text, name)
  local v, err, code = yaml.load(text, name)
  assert.is_nil(v)
  assert.are.equal("EYAML", code)
  return err
end

describe("ops.yaml plain scalars follow PyYAML's YAML 1.1 rules", function()
  -- Each row: text, expected Lua value, expected math.type/type. Checked against PyYAML 6.
  local cases = {
    { "0", 0, "integer" }, { "42", 42, "integer" }, { "-17", -17, "integer" }, { "+4", 4, "integer" },
    { "1_000", 1000, "integer" }, { "0x1F", 31, "integer" }, { "-0x1f", -31, "integer" },
    { "0b101", 5, "integer" }, { "0755", 493, "integer" }, { "1:30", 90, "integer" },
    { "190:20:30", 685230, "integer" }, { "9223372036854775807", math.maxinteger, "integer" },
    { "-9223372036854775808", math.mininteger, "integer" },
    { "1.5", 1.5, "float" }, { ".5", 0.5, "float" }, { "1.", 1.0, "float" }, { "-1.5", -1.5, "float" },
    { "1.0e+3", 1000.0, "float" }, { "1_000.5", 1000.5, "float" }, { "1:30.5", 90.5, "float" },
    { ".inf", math.huge, "float" }, { ".Inf", math.huge, "float" }, { "-.INF", -math.huge, "float" },
    { "0o17", "0o17", "string" }, { "09", "09", "string" }, { "1e3", "1e3", "string" },
    { "1.0e3", "1.0e3", "string" }, { "-.5", "-.5", "string" }, { "0x", "0x", "string" },
    { "2001-12-14", "2001-12-14", "string" }, { "y", "y", "string" }, { "n", "n", "string" },
    { "yEs", "yEs", "string" }, { "nUll", "nUll", "string" },
  }
  for _, c in ipairs(cases) do
    it(("reads %s as the %s %s"):format(c[1], c[3], tostring(c[2])), function()
      local v = scalar(c[1])
      assert.are.equal(c[2], v)
      assert.are.equal(c[3], math.type(v) or type(v))
    end)
  end

  it("reads .nan, .NaN and .NAN as NaN", function()
    for _, s in ipairs { ".nan", ".NaN", ".NAN" } do
      local v = scalar(s)
      assert.are.equal("float", math.type(v))
      assert.is_true(v ~= v)
    end
  end)

  it("reads integers past 64 bits as floats", function()
    assert.are.equal("float", math.type(scalar("99999999999999999999")))
    assert.are.equal(1e20, scalar("99999999999999999999") + 1)
  end)
end)

describe("ops.yaml booleans are YAML 1.1's, as BitOps config uses them", function()
  for _, word in ipairs { "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON" } do
    it("reads " .. word .. " as true", function() assert.is_true(scalar(word)) end)
  end
  for _, word in ipairs { "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF" } do
    it("reads " .. word .. " as false", function() assert.is_false(scalar(word)) end)
  end
  it("reads boolean-looking keys as boolean keys, like PyYAML", function()
    local v = load("on: push\noff: pull\n")
    assert.are.equal("push", v[true])
    assert.are.equal("pull", v[false])
    assert.is_nil(v.on)
  end)
end)

describe("ops.yaml nulls", function()
  it("reads ~, null, Null, NULL and an empty value as ops.yaml.null", function()
    local v = load("a: ~\nb: null\nc: Null\nd: NULL\ne:\n")
    for _, k in ipairs { "a", "b", "c", "d", "e" } do assert.are.equal(null, v[k]) end
  end)
  it("makes null a lightuserdata, distinct from nil and from false", function()
    assert.are.equal("userdata", type(null))
    assert.are_not.equal(false, null)
  end)
  it("loads an empty stream as one null document", function()
    assert.are.equal(null, load(""))
    assert.are.equal(null, load("# only a comment\n"))
  end)
  it("reads integer keys as integers and null keys as null", function()
    local v = load("1: one\n~: nothing\n")
    assert.are.equal("one", v[1])
    assert.are.equal("nothing", v[null])
  end)
end)

describe("ops.yaml quoted scalars and tags", function()
  it("reads quoted scalars as strings whatever they look like", function()
    local v = load("a: '123'\nb: \"yes\"\nc: 'null'\nd: ''\n")
    assert.are.same({ a = "123", b = "yes", c = "null", d = "" }, v)
  end)
  it("honours !!str, !!int, !!float, !!bool and !!null", function()
    local v = load("a: !!str 123\nb: !!int '42'\nc: !!float 1\nd: !!bool 'YES'\ne: !!null x\n")
    assert.are.equal("123", v.a)
    assert.are.equal(42, v.b)
    assert.are.equal("float", math.type(v.c))
    assert.is_true(v.d)
    assert.are.equal(null, v.e)
  end)
  it("rejects a value that does not fit its tag", function()
    assert.matches("<string>:1:4: cannot read 'abc' as !!int", fails("a: !!int abc"), 1, true)
  end)
  it("rejects application tags such as !Ref instead of guessing", function()
    assert.matches("unknown tag !Ref", fails("a: !Ref b"), 1, true)
  end)
  it("lets the last of duplicate keys win", function()
    assert.are.equal(2, load("a: 1\na: 2\n").a)
  end)
end)

describe("ops.yaml anchors, aliases and merge keys", function()
  it("gives an alias the anchored value, sharing tables", function()
    local v = load("a: &x {k: 1}\nb: *x\nc: &s text\nd: *s\n")
    assert.are.equal(v.a, v.b)
    assert.are.equal("text", v.d)
  end)
  it("merges a single mapping under <<, explicit keys winning", function()
    local v = load("base: &b {x: 1, y: 1}\nm:\n  <<: *b\n  y: 2\n")
    assert.are.same({ x = 1, y = 2 }, v.m)
  end)
  it("merges a sequence of mappings, earlier ones winning over later ones", function()
    local v = load("a: &a {k: a, only_a: 1}\nb: &b {k: b, only_b: 1}\nm:\n  <<: [*a, *b]\n")
    assert.are.same({ k = "a", only_a = 1, only_b = 1 }, v.m)
  end)
  it("keeps explicit keys even when they come before the merge", function()
    local v = load("a: &a {k: merged}\nm:\n  k: explicit\n  <<: *a\n")
    assert.are.equal("explicit", v.m.k)
  end)
  it("treats a quoted '<<' as an ordinary key", function()
    local v = load("a: &a {k: 1}\nm:\n  '<<': *a\n")
    assert.are.equal(1, v.m["<<"].k)
  end)
  it("rejects merging a scalar", function()
    assert.matches("merge key '<<' must be a mapping", fails("<<: 1"), 1, true)
  end)
  it("rejects an undefined alias with its position", function()
    assert.matches("<string>:2:4: undefined alias *nope", fails("a: 1\nb: *nope\n"), 1, true)
  end)
  it("rejects an alias to the node that contains it", function()
    assert.matches("recursive structures are not supported", fails("&a [*a]"), 1, true)
  end)
  it("stops an alias bomb early with a clear error", function()
    local lines = { 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]' }
    for i = 1, 9 do
      local ref = ("*a%d"):format(i - 1)
      lines[#lines + 1] = ("a%d: &a%d [%s]"):format(i, i, (ref .. ","):rep(8) .. ref)
    end
    local started = os.clock()
    local err = fails(table.concat(lines, "\n"))
    assert.matches("aliases expand to more than 1000000 nodes", err, 1, true)
    assert.is_true(os.clock() - started < 1)
  end)
end)

describe("ops.yaml.load_all", function()
  it("returns every document in order", function()
    local docs = assert(yaml.load_all("a: 1\n---\n- x\n--- 3\n...\n"))
    assert.are.same({ { a = 1 }, { "x" }, 3 }, docs)
  end)
  it("returns an empty list for an empty stream", function()
    assert.are.same({}, assert(yaml.load_all("")))
  end)
  it("does not let an anchor reach into the next document", function()
    local docs, err = yaml.load_all("a: &x 1\n---\nb: *x\n")
    assert.is_nil(docs)
    assert.matches("<string>:3:4: undefined alias *x", err, 1, true)
  end)
  it("is what load asks for when the stream has more than one document", function()
    assert.matches("<string>:2:1: expected a single document", fails("a: 1\n---\nb: 2\n"), 1, true)
  end)
end)

describe("ops.yaml errors", function()
  it("say name:line:column and the problem", function()
    local err = fails("a: 1\nb: [1, 2\n", "ci.yaml")
    assert.matches("^ci%.yaml:3:1: did not find expected ',' or ']'", err)
  end)
  it("default the name to <string>", function()
    assert.matches("^<string>:2:4: mapping values are not allowed", fails("a: b\n  c: d\n"))
  end)
  it("point at a tab used for indentation", function()
    assert.matches("<string>:2:1: .*a tab; indent YAML with spaces", fails("a:\n\t- b\n"))
  end)
  it("report invalid UTF-8 with its position and byte", function()
    local err = fails("ok: 1\nbad: \xff\n")
    assert.matches("<string>:2:6: invalid leading UTF-8 octet (byte 0xFF)", err, 1, true)
    assert.matches("must be UTF-8", err, 1, true)
  end)
  it("reject 10,000 levels of flow nesting without exhausting the C stack", function()
    local err = fails(("["):rep(10000) .. ("]"):rep(10000))
    assert.matches("<string>:1:513: nesting is deeper than 512 levels", err, 1, true)
  end)
  it("reject 10,000 levels of block nesting", function()
    local lines = {}
    for i = 0, 9999 do lines[#lines + 1] = (" "):rep(i) .. "k:" end
    assert.matches("nesting is deeper than 512 levels", fails(table.concat(lines, "\n")), 1, true)
  end)
  it("accept 512 levels of nesting", function()
    assert.are.equal("table", type(load(("["):rep(512) .. ("]"):rep(512))))
  end)
  it("raise on a non-string argument, since that is a programming mistake", function()
    assert.has_error(function() yaml.load({}) end)
  end)
end)

describe("ops.yaml.load_file", function()
  local path = os.tmpname()
  teardown(function() os.remove(path) end)

  it("loads a file", function()
    local f = assert(io.open(path, "w"))
    f:write("deploy: yes\n")
    f:close()
    assert.are.same({ deploy = true }, yaml.load_file(path))
  end)
  it("names the file in parse errors", function()
    local f = assert(io.open(path, "w"))
    f:write("a: [\n")
    f:close()
    local v, err, code = yaml.load_file(path)
    assert.is_nil(v)
    assert.are.equal("EYAML", code)
    assert.are.equal(path .. ":2:1:", err:sub(1, #path + 5))
  end)
  it("returns ENOENT with the path for a missing file", function()
    local v, err, code = yaml.load_file("/nonexistent/bitops.config.yaml")
    assert.is_nil(v)
    assert.are.equal("ENOENT", code)
    assert.are.equal("ENOENT: no such file: /nonexistent/bitops.config.yaml", err)
  end)
  it("returns EISDIR for a directory", function()
    local _, _, code = yaml.load_file("/")
    assert.are.equal("EISDIR", code)
  end)
end)

describe("ops.yaml large input", function()
  it("loads a 16 MB scalar whole", function()
    local big = ("x"):rep(16 * 1024 * 1024)
    assert.are.equal(#big, #load("k: " .. big).k)
  end)
  it("dumps and reloads a 4 MB multi-line string", function()
    local big = ("line of text\n"):rep(4 * 1024 * 1024 // 13)
    assert.are.equal(big, load(yaml.dump({ k = big })).k)
  end)
end)

describe("ops.yaml.dump", function()
  it("writes 1..n tables as sequences and others as mappings with sorted keys", function()
    assert.are.equal("- 1\n- 2\n", yaml.dump({ 1, 2 }))
    assert.are.equal("a: 1\nb: 2\nc: 3\n", yaml.dump({ c = 3, a = 1, b = 2 }))
  end)
  it("writes an empty table as {} and an ops.yaml.array as []", function()
    assert.are.equal("{}\n", yaml.dump({}))
    assert.are.equal("[]\n", yaml.dump(yaml.array()))
  end)
  it("keeps an empty sequence a sequence through load and dump", function()
    assert.are.equal("a: []\nb: {}\n", yaml.dump(load("a: []\nb: {}\n")))
  end)
  it("writes an ops.yaml.object with keys 1..n as a mapping", function()
    assert.are.equal("1: a\n2: b\n", yaml.dump(yaml.object({ "a", "b" })))
  end)
  it("quotes strings that would otherwise read back as another type", function()
    for _, s in ipairs { "yes", "No", "on", "true", "123", "0x1F", "1.5", "null", "~", "", "<<", "1e3", "y" } do
      local text = yaml.dump({ s })
      assert.matches("^%- ['\"]", text)
      assert.are.equal(s, load(text)[1])
    end
  end)
  it("writes null, booleans, integers and floats so they read back the same", function()
    local v = { null, true, false, 0, -7, math.maxinteger, 0.1, 3.0, 1e20, -0.0, 1 / 3, math.huge, -math.huge }
    local back = load(yaml.dump(v))
    for i = 1, #v do
      assert.are.equal(v[i], back[i])
      assert.are.equal(math.type(v[i]), math.type(back[i]))
    end
    assert.is_true(load(yaml.dump({ 0 / 0 }))[1] ~= load(yaml.dump({ 0 / 0 }))[1])
  end)
  it("round-trips nested data with tricky strings", function()
    local v = {
      name = "ops", list = { "a", "- b", "c: d", "#e", " lead", "trail ", "multi\nline", "tab\there" },
      nested = { deeper = { [1] = "x", [2] = { k = "v" } } }, ["key with: colon"] = "ünïcode ✓",
      ["yes"] = "key that looks boolean", [7] = "integer key",
    }
    assert.are.same(v, load(yaml.dump(v)))
  end)
  it("raises on values YAML cannot hold, naming where they are", function()
    assert.has_error(function() yaml.dump({ a = { print } }) end, "yaml.dump: cannot dump a function at $.a[1]")
    local t = {}
    t.self = t
    assert.has_error(function() yaml.dump(t) end, "yaml.dump: a table contains itself at $.self")
    assert.has_error(function() yaml.dump({ s = "\xff" }) end, "yaml.dump: string is not valid UTF-8 at $.s")
  end)
  it("raises on 10,000 levels of nesting without exhausting the C stack", function()
    local deep = {}
    for _ = 1, 10000 do deep = { deep } end
    local ok, err = pcall(yaml.dump, deep)
    assert.is_false(ok)
    assert.matches("nesting is deeper than 512 levels", err, 1, true)
  end)
end)

describe("yaml.keys", function()
  local yaml = require "ops.yaml"

  it("gives a mapping's keys in document order, not hash order", function()
    local doc = assert(yaml.load("deployments:\n  zeta: 1\n  alpha: 2\n  mid: 3\n  beta: 4\n"))
    assert.are.same({"zeta", "alpha", "mid", "beta"}, yaml.keys(doc.deployments))
  end)

  it("lists a duplicated key once, and merged keys after, sorted", function()
    local doc = assert(yaml.load("base: &b {y: 1, x: 2}\nm:\n  k2: 1\n  k1: 2\n  k2: 3\n  <<: *b\n"))
    assert.are.same({"k2", "k1", "x", "y"}, yaml.keys(doc.m))
    assert.are.equal(3, doc.m.k2)
  end)

  it("sorts the keys of a table that was not loaded from YAML", function()
    assert.are.same({"a", "b", "c"}, yaml.keys({c = 1, a = 2, b = 3}))
    assert.has_error(function() yaml.keys("x") end)
  end)
end)
