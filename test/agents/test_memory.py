"""Episodic and semantic memory on the storage layer (a real unit database), a real faiss index
and the real MiniLM embedding model: recall by time/type/source/tag (episodes waiting for their
commit included, each once), by meaning, and by graph neighbourhood, and all of it still there
after reopening."""
import pytest

from loom_ros.agents.embedding import MiniLMEmbedder, ModelError
from loom_ros.agents.memory import EpisodicMemory, SemanticMemory
from loom_ros.agents.state import AgentStore
from loom_ros.bus.event import Event
from loom_ros.storage.storage import Storage, StorageConfig


@pytest.fixture(scope='module')
def embedder():
    return MiniLMEmbedder()


@pytest.fixture
def storage(tmp_path):
    with Storage(StorageConfig(str(tmp_path), unit='host')) as opened:
        yield opened


def test_episodic_queries_before_and_after_the_commit(storage):
    store = AgentStore(storage, 'voice')
    memory = EpisodicMemory(store)
    for i, (type_, source, tags) in enumerate([('speech', 'mic', ['user']), ('face', 'cam', []),
                                               ('speech', 'mic', ['user', 'question']),
                                               ('speech', 'tv', [])]):
        memory.record(Event(type=type_, source=source, tags=tags, id=f'e{i}',
                            timestamp_ms=1000 + i * 100, payload=b'hello sk-abcdefghijklmnopqrst'))
        if i == 1:   # e0, e1 committed; e2, e3 wait for the next commit
            store.commit({}, 2, 'e1').wait()
    assert len(storage.episodes.query('voice')) == 2
    for _ in range(2):   # waiting, then committed: the same answers, each episode once
        assert [r['event_id'] for r in memory.query(type='speech')] == ['e0', 'e2', 'e3']
        assert [r['event_id'] for r in memory.query(start_ms=1100, end_ms=1250)] == ['e1', 'e2']
        assert [r['event_id'] for r in memory.query(tag='question')] == ['e2']
        assert [r['event_id'] for r in memory.query(source='mic', limit=1)] == ['e0']
        assert [r['event_id'] for r in memory.query(limit=3)] == ['e0', 'e1', 'e2']
        # Masked the same way whether it is waiting or stored.
        payloads = {r['payload'] for r in memory.query()}
        assert len(payloads) == 1 and 'abcdefghijklmnopqrst' not in payloads.pop()
        store.commit({}, 4, 'e3').wait()
    other = EpisodicMemory(AgentStore(storage, 'face'))  # agents do not see each other's
    assert other.query() == []


def test_semantic_recall_by_meaning_and_by_graph_survives_reopening(tmp_path, embedder):
    storage = Storage(StorageConfig(str(tmp_path), unit='host'))
    memory = SemanticMemory(storage, 'voice', embedder)
    memory.add_fact('Alice', 'likes', 'green tea', provenance='utterance e1')
    memory.add_fact('Alice', 'works_in', 'the robotics lab', provenance='utterance e2')
    memory.add_fact('the robotics lab', 'is_on', 'the third floor', provenance='map')
    memory.add_fact('Bob', 'drives', 'a red car', provenance='utterance e7')

    best = memory.similar('what drink does Alice enjoy', k=2)
    assert best[0]['object'] == 'green tea' and best[0]['score'] > best[1]['score']
    assert memory.similar('vehicle', k=1)[0]['subject'] == 'Bob'

    near = memory.neighbourhood('Alice', depth=1)
    assert {f['object'] for f in near} == {'green tea', 'the robotics lab'}
    two_hops = memory.neighbourhood('Alice', depth=2)
    assert 'the third floor' in {f['object'] for f in two_hops}

    storage.close()
    with Storage(StorageConfig(str(tmp_path), unit='host')) as storage:
        reopened = SemanticMemory(storage, 'voice', embedder)
        assert reopened.index.ntotal == 4
        assert reopened.similar('what drink does Alice enjoy', k=1)[0]['provenance'] == \
            'utterance e1'


def test_missing_or_corrupt_model_is_a_clear_error(tmp_path):
    broken = tmp_path / 'model.onnx'
    broken.write_bytes(b'not an onnx file')
    with pytest.raises(ModelError, match='cannot load the embedding model'):
        MiniLMEmbedder(model_path=broken)
