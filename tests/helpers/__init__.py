"""What the tests import (never from conftest.py, which holds only fixtures): the CLI runners,
tiny models, servers, Pilot drivers and the adapters, templates and engines several tests share."""
