"""A profile's [media] rule on remote URLs in a request (CONTRACT 11: refused per
line unless the profile allows them), checked before a line reaches vLLM."""

from batchd.profiles import MediaOptions

IMAGE = {"messages": [{"role": "user", "content": [
    {"type": "text", "text": "what is this?"},
    {"type": "image_url", "image_url": {"url": "https://cdn.example.com/cat.png"}}]}]}
DATA = {"messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}
RESPONSES = {"input": [{"role": "user", "content": [
    {"type": "input_image", "image_url": "HTTP://cdn.example.com/x.png"}]}]}


def test_remote_urls_are_refused_by_default_naming_the_field():
    assert MediaOptions().violation(IMAGE)[0] == "messages.0.content.1.image_url.url"
    assert MediaOptions().violation(RESPONSES)[0] == "input.0.content.0.image_url"


def test_data_urls_and_tool_schemas_are_not_media():
    tools = {**DATA, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"properties": {"url": {"default": "https://x.org"}}}}}]}
    assert MediaOptions().violation(tools) is None


def test_a_profile_may_allow_remote_media_for_some_hosts():
    assert MediaOptions(allow_remote=True).violation(IMAGE) is None
    allowed = MediaOptions(allow_remote=True, allowed_domains=["cdn.example.com"])
    assert allowed.violation(IMAGE) is None
    other = MediaOptions(allow_remote=True, allowed_domains=["images.example.org"])
    assert other.violation(IMAGE)[0] == "messages.0.content.1.image_url.url"
