"""lib/redact.py: a URL shown without its credentials, the credentials themselves for the log's and the
alerts' redaction, and secrets replaced in any text."""

from __future__ import annotations

import pytest

from lib import redact


@pytest.mark.parametrize("url, shown", [
    # Nothing secret: the URL as it was.
    ("https://restcountries.com/v3.1/all?fields=name,area", "https://restcountries.com/v3.1/all?fields=name,area"),
    ("http://127.0.0.1:8080/v3.1/all", "http://127.0.0.1:8080/v3.1/all"),
    ("https://restcountries.com", "https://restcountries.com"),
    # Userinfo: a user alone (often a token), a user and a password, encoded characters, an '@' in it.
    ("https://tok3n@api.example.com/all", "https://***@api.example.com/all"),
    ("https://reader:s3cret@api.example.com:8443/all?fields=name", "https://***@api.example.com:8443/all?fields=name"),
    ("https://us%40er:p%3As%2Fs@api.example.com/", "https://***@api.example.com/"),
    ("https://user:p@ss@api.example.com/", "https://***@api.example.com/"),
    ("https://:only-pass@api.example.com/", "https://***@api.example.com/"),
    # Credential-like query parameters, whatever their case, among others that stay.
    ("https://h/all?fields=name,area&apikey=K1&page=2", "https://h/all?fields=name,area&apikey=***&page=2"),
    ("https://h/all?api_key=a&key=b&token=c&access_token=d&password=e&passwd=f&pwd=g&secret=h",
     "https://h/all?api_key=***&key=***&token=***&access_token=***&password=***&passwd=***&pwd=***&secret=***"),
    ("https://h/?sig=a&signature=b&auth=c&credential=d&credentials=e", "https://h/?sig=***&signature=***&auth=***"
     "&credential=***&credentials=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2026&X-Amz-Date=20260101T"
     "000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=abc123",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=20260101T"
     "000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=***"),
    ("https://h/?APIKEY=a&Api-Key=b&X-Api-Key=c&client_secret=d&refreshToken=e&db_password=f&Sig=g",
     "https://h/?APIKEY=***&Api-Key=***&X-Api-Key=***&client_secret=***&refreshToken=***&db_password=***&Sig=***"),
    ("https://h/?token=a+b%20c&fields=name", "https://h/?token=***&fields=name"),  # encoded values
    ("https://h/?ap%69key=a", "https://h/?ap%69key=***"),  # an encoded name
    ("https://h/?token=&token&fields=", "https://h/?token=&token&fields="),  # no value: nothing to hide
    # A fragment: kept, its credential-like parameters masked too (OAuth's implicit grant puts tokens there).
    ("https://h/cb?fields=name#section", "https://h/cb?fields=name#section"),
    ("https://h/cb#access_token=abc&state=xyz", "https://h/cb#access_token=***&state=xyz"),
    # IPv6 hosts and ports.
    ("http://[::1]:8080/v3.1/all?key=k", "http://[::1]:8080/v3.1/all?key=***"),
    ("http://user:pw@[2001:db8::1]:8443/all", "http://***@[2001:db8::1]:8443/all"),
    ("http://user:pw@[::1]/", "http://***@[::1]/"),
    # Not http: the same rules.
    ("postgresql://medallion:pw@127.0.0.1:5432/countries", "postgresql://***@127.0.0.1:5432/countries"),
])
def test_a_url_is_shown_without_its_credentials(url, shown):
    assert redact.url(url) == shown
    assert redact.url(shown) == shown  # masking a masked URL changes nothing


def test_a_url_that_cannot_be_parsed_is_not_shown():
    assert redact.url("http://user:pw@[::1/all") == redact.MASK


def test_a_url_without_credentials_is_unchanged_byte_for_byte():
    for url in ("https://restcountries.com/v3.1/all?fields=name,capital", "http://h:1/p;x?a=1&b=2#f",
                "https://h/path/?", "https://h/path#", "lib/data/countries_v3.1.json", ""):
        assert redact.url(url) == url


@pytest.mark.parametrize("url, pieces", [
    ("https://restcountries.com/v3.1/all?fields=name", []),
    ("https://tok3n@h/", ["tok3n"]),  # a user alone is the credential
    ("https://reader:s3cret@h/", ["s3cret"]),  # a user with a password: the password
    ("https://reader:p%40ss%2Fword@h/", ["p%40ss%2Fword", "p@ss/word"]),  # as written and as sent
    ("https://h/?fields=name&apikey=K1&token=a+b%20c#access_token=F", ["a+b%20c", "a b c", "K1", "F"]),
    ("http://u:pw@[::1", []),  # not parseable: no piece to look for (the URL itself is shown as ***)
])
def test_the_secret_pieces_of_a_url(url, pieces):
    assert sorted(redact.url_secrets(url)) == sorted(pieces)


def test_secrets_are_replaced_in_text_longest_first():
    text = "GET /all?key=abcdef failed; user abc; abcdef again"
    assert redact.text(text, ["abc", "abcdef", ""]) == "GET /all?key=*** failed; user ***; *** again"
    assert redact.text(text, []) == text


def test_a_url_and_its_secrets_in_an_error_text():
    url = "http://reader:pw1234@127.0.0.1:9/v3.1/all?fields=name&apikey=K5678"
    error = ("ConnectionError: HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: "
             "/v3.1/all?fields=name&apikey=K5678")
    assert redact.text(f"GET {url} failed: {error}", redact.url_secrets(url)) == (
        "GET http://reader:***@127.0.0.1:9/v3.1/all?fields=name&apikey=*** failed: ConnectionError: "
        "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: /v3.1/all?fields=name&apikey=***")
