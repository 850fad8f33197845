-- Specification of ops.crypto: digests, MACs, comparison, randomness, codecs.

local crypto = require("ops.crypto")

describe("ops.crypto", function()
  describe("sha256", function()
    it("matches the FIPS 180-2 vectors for '' and 'abc'", function()
      assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", crypto.sha256(""))
      assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", crypto.sha256("abc"))
    end)

    it("returns the 32 raw bytes when raw is true", function()
      local raw = crypto.sha256("abc", true)
      assert.equal(32, #raw)
      assert.equal(crypto.sha256("abc"), crypto.hex(raw))
    end)

    it("hashes binary data including NUL bytes", function()
      assert.are_not.equal(crypto.sha256("a\0b"), crypto.sha256("a"))
    end)
  end)

  describe("hmac_sha256", function()
    it("matches GitHub's webhook signature example", function()
      assert.equal("757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        crypto.hmac_sha256("It's a Secret to Everybody", "Hello, World!"))
    end)

    it("matches RFC 4231 test case 2", function()
      assert.equal("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        crypto.hmac_sha256("Jefe", "what do ya want for nothing?"))
    end)

    it("returns raw bytes when raw is true", function()
      assert.equal(32, #crypto.hmac_sha256("k", "d", true))
    end)

    it("matches RFC 4231 test cases 1, 3, 4, 6 and 7 (a key longer than a block is hashed first)", function()
      local cases = {
        {string.rep("\x0b", 20), "Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"},
        {string.rep("\xaa", 20), string.rep("\xdd", 50), "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"},
        {"\1\2\3\4\5\6\7\8\9\10\11\12\13\14\15\16\17\18\19\20\21\22\23\24\25", string.rep("\xcd", 50),
          "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"},
        {string.rep("\xaa", 131), "Test Using Larger Than Block-Size Key - Hash Key First",
          "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"},
        {string.rep("\xaa", 131), "This is a test using a larger than block-size key and a larger than block-size data. "
          .. "The key needs to be hashed before being used by the HMAC algorithm.",
          "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"},
      }
      for _, c in ipairs(cases) do assert.equal(c[3], crypto.hmac_sha256(c[1], c[2])) end
      assert.equal("b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad", crypto.hmac_sha256("", ""))
    end)

    -- HMAC written out on sha256 (RFC 2104), to check keys used again, in any order
    local function reference(key, data)
      if #key > 64 then key = crypto.sha256(key, true) end
      key = key .. string.rep("\0", 64 - #key)
      local ipad, opad = {}, {}
      for i = 1, 64 do
        ipad[i] = string.char(key:byte(i) ~ 0x36)
        opad[i] = string.char(key:byte(i) ~ 0x5c)
      end
      return crypto.sha256(table.concat(opad) .. crypto.sha256(table.concat(ipad) .. data, true))
    end

    it("gives each key its own MAC, used again after many other keys, in any order", function()
      local keys = {"", "a", "secret", "secret ", "Secret", "s\0cret", string.rep("k", 64), string.rep("k", 65),
        string.rep("x", 200), "It's a Secret to Everybody", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8"}
      for round = 1, 3 do
        for i = 1, #keys do
          local key = keys[(i * (round * 5 + 1)) % #keys + 1]
          for _, data in ipairs({"", "Hello, World!", string.rep("d", 1000)}) do
            assert.equal(reference(key, data), crypto.hmac_sha256(key, data), key)
          end
        end
      end
    end)
  end)

  describe("verify_hmac_sha256", function()
    local key, body = "It's a Secret to Everybody", "Hello, World!"
    local sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

    it("accepts GitHub's X-Hub-Signature-256 header value, in either case", function()
      assert.is_true(crypto.verify_hmac_sha256(key, body, sig))
      assert.is_true(crypto.verify_hmac_sha256(key, body, sig:upper():gsub("^SHA256", "sha256")))
    end)

    it("rejects a wrong, truncated or missing signature", function()
      assert.is_false(crypto.verify_hmac_sha256(key, body .. "!", sig))
      assert.is_false(crypto.verify_hmac_sha256(key, body, sig:sub(1, -2)))
      assert.is_false(crypto.verify_hmac_sha256(key, body, nil))
    end)
  end)

  describe("equals", function()
    it("is true only for identical strings", function()
      assert.is_true(crypto.equals("abc", "abc"))
      assert.is_true(crypto.equals("", ""))
      assert.is_false(crypto.equals("abc", "abd"))
      assert.is_false(crypto.equals("abc", "ab"))
      assert.is_false(crypto.equals("a\0", "a"))
    end)

    it("raises on non-string arguments", function()
      assert.has_error(function() crypto.equals("a", nil) end)
    end)
  end)

  describe("random", function()
    it("returns n bytes that differ between calls", function()
      assert.equal(0, #crypto.random(0))
      assert.equal(64, #crypto.random(64))
      assert.are_not.equal(crypto.random(16), crypto.random(16))
      assert.equal(32, #crypto.random_hex(16))
    end)

    it("refuses negative sizes and more than 1 MiB", function()
      assert.has_error(function() crypto.random(-1) end)
      assert.has_error(function() crypto.random(1024 * 1024 + 1) end)
      assert.equal(1024 * 1024, #crypto.random(1024 * 1024))
    end)
  end)

  describe("hex", function()
    it("round-trips every byte value", function()
      local all = {}
      for i = 0, 255 do all[#all + 1] = string.char(i) end
      all = table.concat(all)
      assert.equal("00017f80ff", crypto.hex("\0\1\127\128\255"))
      assert.equal(all, crypto.unhex(crypto.hex(all)))
      assert.equal("\171\205", crypto.unhex("ABcd"))
    end)

    it("returns nil, err, 'EINVAL' for odd length or non-hex input", function()
      assert.same({ nil, "EINVAL: hex string has an odd number of digits", "EINVAL" }, { crypto.unhex("abc") })
      local ok, _, code = crypto.unhex("zz")
      assert.is_nil(ok)
      assert.equal("EINVAL", code)
    end)
  end)

  describe("base64", function()
    it("encodes the RFC 4648 vectors with padding", function()
      local vectors = { [""] = "", f = "Zg==", fo = "Zm8=", foo = "Zm9v", foob = "Zm9vYg==",
        fooba = "Zm9vYmE=", foobar = "Zm9vYmFy" }
      for plain, encoded in pairs(vectors) do
        assert.equal(encoded, crypto.base64_encode(plain))
        assert.equal(plain, crypto.base64_decode(encoded))
      end
    end)

    it("round-trips binary data of every length up to 64", function()
      for n = 0, 64 do
        local s = crypto.random(n)
        assert.equal(s, crypto.base64_decode(crypto.base64_encode(s)))
      end
    end)

    it("accepts line-wrapped input and missing padding", function()
      assert.equal("foobar", crypto.base64_decode("Zm9v\nYmFy\n"))
      assert.equal("foob", crypto.base64_decode("Zm9vYg"))
      assert.equal("fooba", crypto.base64_decode(" Zm9vYmE "))
    end)

    it("returns nil, err, 'EINVAL' for malformed input", function()
      for _, bad in ipairs({ "Zm9v!", "Z", "Zg=", "Zg===", "Zg==Zg==", "Z=g=", "Zm9-" }) do
        local ok, err, code = crypto.base64_decode(bad)
        assert.is_nil(ok, bad)
        assert.equal("EINVAL", code, bad)
        assert.truthy(err:find("^EINVAL: base64"), bad)
      end
    end)
  end)
end)
