from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Number(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: int
    def __init__(self, value: _Optional[int] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: int
    def __init__(self, value: _Optional[int] = ...) -> None: ...

class Square(_message.Message):
    __slots__ = ("value", "instance")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    value: int
    instance: int
    def __init__(self, value: _Optional[int] = ..., instance: _Optional[int] = ...) -> None: ...

class Total(_message.Message):
    __slots__ = ("total", "count", "instance")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    total: int
    count: int
    instance: int
    def __init__(self, total: _Optional[int] = ..., count: _Optional[int] = ..., instance: _Optional[int] = ...) -> None: ...
