from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Question(_message.Message):
    __slots__ = ("id", "question", "gold_pid")
    ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    GOLD_PID_FIELD_NUMBER: _ClassVar[int]
    id: str
    question: str
    gold_pid: str
    def __init__(self, id: _Optional[str] = ..., question: _Optional[str] = ..., gold_pid: _Optional[str] = ...) -> None: ...

class Answer(_message.Message):
    __slots__ = ("question_id", "question", "text")
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    question_id: str
    question: str
    text: str
    def __init__(self, question_id: _Optional[str] = ..., question: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Claim(_message.Message):
    __slots__ = ("question_id", "text")
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    question_id: str
    text: str
    def __init__(self, question_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class QueryToken(_message.Message):
    __slots__ = ("claim", "text")
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    claim: str
    text: str
    def __init__(self, claim: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Passage(_message.Message):
    __slots__ = ("id", "title", "text", "score")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    text: str
    score: float
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Candidates(_message.Message):
    __slots__ = ("claim", "query", "passages")
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    claim: str
    query: str
    passages: _containers.RepeatedCompositeFieldContainer[Passage]
    def __init__(self, claim: _Optional[str] = ..., query: _Optional[str] = ..., passages: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ...) -> None: ...

class EncodedQuery(_message.Message):
    __slots__ = ("claim", "query", "embedding", "passages")
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    claim: str
    query: str
    embedding: bytes
    passages: _containers.RepeatedCompositeFieldContainer[Passage]
    def __init__(self, claim: _Optional[str] = ..., query: _Optional[str] = ..., embedding: _Optional[bytes] = ..., passages: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("claim", "query", "passages")
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    claim: str
    query: str
    passages: _containers.RepeatedCompositeFieldContainer[Passage]
    def __init__(self, claim: _Optional[str] = ..., query: _Optional[str] = ..., passages: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ...) -> None: ...
