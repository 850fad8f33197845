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
