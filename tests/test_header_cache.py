"""The edge's cache of conversation headers (api.context.HeaderCache), without servers."""

from __future__ import annotations

from api.context import HeaderCache
from events.ids import new_id
from events.vocabulary import ConversationCreated


def _header() -> ConversationCreated:
    return ConversationCreated(conversation_id=new_id(), at=1, event_id=new_id(), user_id="u")


def test_where_a_conversation_made_here_begins_is_told_once() -> None:
    cache = HeaderCache()
    made, read = _header(), _header()
    cache.put(made, made_at=7)
    cache.put(read)  # read from the log: where its end is, is not known here
    assert cache.made_at(made.conversation_id) == 7
    assert cache.made_at(made.conversation_id) is None
    assert cache.made_at(read.conversation_id) is None
    assert cache.get(made.conversation_id) == made


def test_a_header_pushed_out_of_the_cache_takes_its_position_with_it() -> None:
    cache = HeaderCache(size=2)
    first, second, third = _header(), _header(), _header()
    cache.put(first, made_at=1)
    cache.put(second, made_at=2)
    cache.put(third, made_at=3)
    assert cache.get(first.conversation_id) is None
    assert cache.made_at(first.conversation_id) is None
    assert cache.made_at(third.conversation_id) == 3
