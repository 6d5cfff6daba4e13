"""JWT bearer tokens against a `kiln serve` with `auth.jwt` (JWKS file, issuer, audience).

Usage: jwt_auth.py keygen DIR [KID]  writes DIR/jwks.json (kid KID, default k1, RS256) and DIR/private.pem
       jwt_auth.py token DIR          prints a valid token signed with DIR/private.pem, naming its kid
       jwt_auth.py check URL DIR      signs tokens with DIR/private.pem and checks what Kiln accepts
"""

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiln_client import check, create, done, http_session, text_of

ISS, AUD = "https://idp.test", "kiln"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}


def keygen(d, kid="k1"):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    open(f"{d}/private.pem", "wb").write(pem)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
    json.dump({"keys": [jwk]}, open(f"{d}/jwks.json", "w"))


def token(key, kid="k1", **overrides):
    claims = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": int(time.time()) + 300,
              "scope": "tools:read tools:write tools:run openid", "kiln_hosts": ["allowed.example.com"]}
    claims.update(overrides)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def status_of(url, tok):
    req = urllib.request.Request(url, data=json.dumps(INIT).encode(), method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "Authorization": f"Bearer {tok}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def check_all(url, d):
    key = open(f"{d}/private.pem", "rb").read()
    good = token(key)
    check(status_of(url, good) == 200, "a valid token is accepted")
    check(status_of(url, token(key, exp=int(time.time()) - 3600)) == 401, "an expired token: 401")
    check(status_of(url, token(key, aud="someone-else")) == 401, "a token for another audience: 401")
    check(status_of(url, token(key, iss="https://evil.test")) == 401, "a token from another issuer: 401")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    check(status_of(url, token(other)) == 401, "a token signed by another key: 401")
    # The JWKS is public: an HMAC "signed" with its key material must not pass as the RSA key.
    public_n = json.load(open(f"{d}/jwks.json"))["keys"][0]["n"]
    forged = jwt.encode({"iss": ISS, "aud": AUD, "sub": "mallory", "exp": int(time.time()) + 300,
                         "scope": "admin"}, public_n, algorithm="HS256", headers={"kid": "k1"})
    check(status_of(url, forged) == 401, "HS256 with public key material (algorithm confusion): 401")

    reader = token(key, scope="tools:read")
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "tool_create", "arguments": {"name": "x", "description": "d", "code": "1"}}}
    req = urllib.request.Request(url, data=json.dumps(call).encode(), method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "Authorization": f"Bearer {reader}"})
    try:
        urllib.request.urlopen(req, timeout=30)
        code = 200
    except urllib.error.HTTPError as e:
        code = e.code
    check(code == 403, "a token without tools:write cannot create tools: 403", code)

    async with http_session(url, token=good) as s:
        r = await s.call_tool("tool_create", {"name": "far", "description": "d", "code": "1",
                                              "permissions": {"network": ["elsewhere.example.org"]}})
        check(r.is_error and "elsewhere.example.org" in text_of(r), "hosts beyond the token's kiln_hosts are refused",
              text_of(r))
        await create(s, name="near", description="d", code="(a) => 7", permissions={"network": ["allowed.example.com"]})
        v = await s.call_tool("tool_versions", {"name": "near"})
        check(v.structured_content["versions"][0]["actor"] == "jwt:alice", "the actor is jwt:<sub>",
              v.structured_content)
    done()


if sys.argv[1] == "keygen":
    keygen(*sys.argv[2:4])
elif sys.argv[1] == "token":
    kid = json.load(open(f"{sys.argv[2]}/jwks.json"))["keys"][0]["kid"]
    print(token(open(f"{sys.argv[2]}/private.pem", "rb").read(), kid=kid))
else:
    asyncio.run(check_all(sys.argv[2], sys.argv[3]))
