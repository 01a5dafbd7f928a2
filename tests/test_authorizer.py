"""An authorizer that denies the cumulus resource shuts every route."""

from __future__ import annotations

import json
import os

import pytest
from conftest import cumulus_server_config
from jupyter_server.auth.authorizer import Authorizer
from test_rest import ROUTES, submit_body
from tornado.httpclient import HTTPClientError


class DenyCumulus(Authorizer):
    """Allows everything except cumulus jobs."""

    def is_authorized(self, handler, user, action, resource):
        return resource != "cumulus"


@pytest.fixture
def jp_server_config(tmp_path):
    return cumulus_server_config(tmp_path, authorizer_class=DenyCumulus)


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_denied_resource_is_403_everywhere(jp_fetch, jp_serverapp, method, path):
    parts = path.replace("JOB", "abcdef123456").split("/")
    body = submit_body() if method == "POST" else None
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("cumulus", "api", *parts, method=method, body=body)
    assert info.value.code == 403
    assert json.loads(info.value.response.body)["error"] == "forbidden"
    root = jp_serverapp.config["CumulusApp"]["job_root"]
    assert not os.path.exists(root) or os.listdir(root) == []
