import pytest

from tests.chat.models import tiny_chat


@pytest.fixture(scope="package")
def tiny_chat_model():
    return tiny_chat()
