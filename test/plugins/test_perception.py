"""Perception on real models and real photos: the astronaut photo from scikit-image is one face,
happy; photos without a face give none; sensor_msgs/Image conversions survive serialization;
the plugins behave as the contract says (counted bad input, capability checks, config errors)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
from PIL import Image

from loom_ros.bus.event import Event, Privacy
from loom_ros.plugins.contract import (CapabilityDenied, HealthState, PluginContext, PluginError,
                                       load_plugin_class)
from loom_ros.plugins.perception.expression import LABELS, ExpressionClassifier, square_crop
from loom_ros.plugins.perception.face import FaceDetector, ssd_anchors
from loom_ros.plugins.perception.image import (ImageError, decode_image, encode_png, frame_event,
                                               image_from_event, image_from_msg, image_to_msg)
from loom_ros.plugins.perception.plugins import vectors_from_event

CAMERA = frozenset({'camera.read'})
# The astronaut's face in skimage.data.astronaut() (512x512), drawn by hand: x 170..285, y 70..190.
FACE_REGION = (170, 70, 285, 190)


@pytest.fixture(scope='module')
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope='module')
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope='module')
def classifier() -> ExpressionClassifier:
    return ExpressionClassifier()


def plugin(name: str, granted=CAMERA, **config):
    instance = load_plugin_class(name)()
    instance.init(PluginContext(name, config=config, granted=granted))
    return instance


def inside(box, region) -> bool:
    return region[0] <= box[0] < box[2] <= region[2] and region[1] <= box[1] < box[3] <= region[3]


# -- face detection ----------------------------------------------------------------------------
def test_anchor_layout_matches_mediapipe_short_range():
    anchors = ssd_anchors()
    assert anchors.shape == (896, 2)
    # 16x16 grid (stride 8) with 2 anchors per cell, then 8x8 (three stride-16 layers) with 6.
    np.testing.assert_allclose(anchors[:2], [[0.5 / 16, 0.5 / 16]] * 2)
    np.testing.assert_allclose(anchors[512:518], [[0.5 / 8, 0.5 / 8]] * 6)
    np.testing.assert_allclose(anchors[-1], [7.5 / 8, 7.5 / 8])


def test_astronaut_is_one_face_around_her_face(detector, astronaut):
    faces = detector.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0.8
    assert inside(face.box, FACE_REGION), face.box
    assert 60 < face.width < 130 and 60 < face.height < 130
    for name in ('right_eye', 'left_eye', 'nose_tip', 'mouth'):
        x, y = face.keypoints[name]
        assert face.box[0] < x < face.box[2] and face.box[1] < y < face.box[3], name
    eyes_y = (face.keypoints['right_eye'][1] + face.keypoints['left_eye'][1]) / 2
    assert eyes_y < face.keypoints['nose_tip'][1] < face.keypoints['mouth'][1]
    assert face.keypoints['right_eye'][0] < face.keypoints['left_eye'][0]  # the subject's right


def test_letterboxed_640x480_frame_maps_back_to_pixels(detector, astronaut):
    """The same face in a 640x480 frame (wider than tall: letterbox bars top and bottom) lands
    at the scaled coordinates."""
    frame = np.asarray(Image.fromarray(astronaut).resize((640, 480), Image.Resampling.BILINEAR))
    faces = detector.detect(frame)
    assert len(faces) == 1
    sx, sy = 640 / 512, 480 / 512
    scaled = (FACE_REGION[0] * sx, FACE_REGION[1] * sy, FACE_REGION[2] * sx, FACE_REGION[3] * sy)
    assert inside(faces[0].box, scaled), faces[0].box


def test_no_face_in_coffee_or_a_blank_frame(detector):
    assert detector.detect(skimage.data.coffee()) == []
    assert detector.detect(np.zeros((480, 640, 3), np.uint8)) == []
    assert detector.detect(np.full((480, 640, 3), 255, np.uint8)) == []


def test_several_faces_are_kept_apart_by_nms(detector, astronaut):
    crop = astronaut[40:240, 120:330]
    faces = detector.detect(np.hstack([crop, np.fliplr(crop), crop]))
    assert len(faces) == 3
    centres = sorted((f.box[0] + f.box[2]) / 2 for f in faces)
    assert centres[0] < 210 < centres[1] < 420 < centres[2]
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


def test_detector_config_errors():
    from loom_ros.plugins.backends import ModelError
    with pytest.raises(ModelError, match='min_score'):
        FaceDetector(min_score=1.5)
    with pytest.raises(ValueError, match='uint8 RGB'):
        FaceDetector().detect(np.zeros((10, 10), np.uint8))


# -- expression --------------------------------------------------------------------------------
def test_astronaut_is_happy(detector, classifier, astronaut):
    face = detector.detect(astronaut)[0]
    expression = classifier.classify_box(astronaut, face.box)
    assert expression.label == 'happy'
    assert expression.confidence > 0.9
    assert set(expression.scores) == set(LABELS)
    assert abs(sum(expression.scores.values()) - 1.0) < 1e-3


def test_grey_crop_and_a_crop_beyond_the_frame(classifier, astronaut):
    grey = np.asarray(Image.fromarray(astronaut[70:190, 170:285]).convert('L'))
    assert classifier.classify(grey).label == 'happy'
    # A box hanging off the top-left corner: edge pixels fill the square, no crash.
    crop = square_crop(astronaut, (-50, -50, 30, 30), 0.1)
    assert crop.shape[:2] == (96, 96)
    assert classifier.classify(crop).label in LABELS
    with pytest.raises(ValueError, match='outside'):
        square_crop(astronaut, (600, 600, 700, 700), 0.1)


# -- images and sensor_msgs/Image --------------------------------------------------------------
@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'mono8', 'rgba8', 'bgra8'])
def test_sensor_msgs_image_round_trip_through_serialization(astronaut, encoding):
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image as ImageMsg
    msg = image_to_msg(astronaut, encoding, frame_id='camera_front_optical')
    assert (msg.width, msg.height, msg.encoding) == (512, 512, encoding)
    back = deserialize_message(serialize_message(msg), ImageMsg)
    assert back.header.frame_id == 'camera_front_optical'
    rgb = image_from_msg(back)
    assert rgb.shape == (512, 512, 3)
    if encoding == 'mono8':
        assert (rgb[..., 0] == rgb[..., 1]).all()
        expected = np.asarray(Image.fromarray(astronaut).convert('L'))
        assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    else:
        np.testing.assert_array_equal(rgb, astronaut)


def test_padded_rows_and_msg_like_objects(detector, astronaut):
    """A driver's padded rows (step > width * 3), in a plain object: no rclpy needed."""
    bgr = astronaut[:, :, ::-1]
    padded = np.zeros((512, 512 * 3 + 64), np.uint8)
    padded[:, :512 * 3] = bgr.reshape(512, -1)
    msg = SimpleNamespace(width=512, height=512, encoding='bgr8', is_bigendian=0,
                          step=512 * 3 + 64, data=padded.tobytes())
    rgb = image_from_msg(msg)
    np.testing.assert_array_equal(rgb, astronaut)
    assert len(detector.detect(rgb)) == 1


def test_bad_frames_are_image_errors(astronaut):
    good = dict(width=512, height=512, encoding='rgb8', is_bigendian=0, step=1536)
    with pytest.raises(ImageError, match='needs 786432'):
        image_from_msg(SimpleNamespace(**good, data=astronaut.tobytes()[:1000]))
    with pytest.raises(ImageError, match="unsupported encoding '16UC1'"):
        image_from_msg(SimpleNamespace(**{**good, 'encoding': '16UC1'}, data=b'\0' * 10))
    with pytest.raises(ImageError, match='step 10 is shorter'):
        image_from_msg(SimpleNamespace(**{**good, 'step': 10}, data=astronaut.tobytes()))
    with pytest.raises(ImageError, match='empty'):
        image_from_msg(SimpleNamespace(**{**good, 'width': 0}, data=b''))
    with pytest.raises(ImageError, match='cannot decode'):
        decode_image(b'\x89PNG\r\n\x1a\n' + b'\0' * 100)


def test_frame_events_png_jpeg_and_raw(astronaut):
    np.testing.assert_array_equal(image_from_event(frame_event(astronaut, png=True)), astronaut)
    np.testing.assert_array_equal(decode_image(encode_png(astronaut)), astronaut)
    raw = frame_event(astronaut, encoding='bgr8')
    assert raw.metadata == {'width': '512', 'height': '512', 'encoding': 'bgr8'}
    np.testing.assert_array_equal(image_from_event(raw), astronaut)
    import io
    jpeg = io.BytesIO()
    Image.fromarray(astronaut).save(jpeg, format='JPEG', quality=90)
    decoded = image_from_event(Event(type='camera.frame', payload=jpeg.getvalue()))
    assert decoded.shape == (512, 512, 3)
    with pytest.raises(ImageError, match='need metadata width, height, encoding'):
        image_from_event(Event(type='camera.frame', payload=b'\1\2\3'))
    with pytest.raises(ImageError, match='must be integers'):
        image_from_event(Event(type='camera.frame', payload=b'\1\2\3',
                               metadata={'width': 'a', 'height': '1', 'encoding': 'rgb8'}))


# -- plugins -----------------------------------------------------------------------------------
def test_face_detector_plugin(astronaut):
    detector = plugin('face_detector')
    frame = frame_event(astronaut, type='camera.frame', png=True, frame_id='camera_front_optical',
                        source='camera/front')
    response = detector.handle_event(frame)
    assert response.ok, response.error
    [event] = response.events
    assert event.type == 'face.detected'
    assert event.privacy == Privacy.SENSITIVE and event.frame_id == 'camera_front_optical'
    assert event.metadata['source_event'] == frame.id
    assert event.timestamp_ms == frame.timestamp_ms
    data = event.json()
    assert (data['width'], data['height'], len(data['faces'])) == (512, 512, 1)
    assert inside(data['faces'][0]['box'], FACE_REGION)
    x, y, w, h = data['faces'][0]['bbox']
    assert 0 < x < 1 and 0 < y < 1 and 0 < w < 1 and 0 < h < 1

    none = detector.handle_event(frame_event(skimage.data.coffee()))
    assert none.ok and none.events == []
    bad = detector.handle_event(Event(type='camera.frame', payload=b'not an image'))
    assert not bad.ok and 'neither PNG nor JPEG' in bad.error
    health = detector.health()
    assert health.state is HealthState.OK
    assert health.details['events'] == '3' and health.details['bad_input'] == '1'
    detector.shutdown()


def test_vision_needs_camera_read(astronaut):
    audits = []
    detector = load_plugin_class('face_detector')()
    detector.init(PluginContext('face_detector', granted=frozenset(), audit_sink=audits.append))
    with pytest.raises(CapabilityDenied, match='camera.read'):
        detector.handle_event(frame_event(astronaut))
    assert audits[0]['kind'] == 'capability_denied' and audits[0]['capability'] == 'camera.read'


def test_plugin_config_is_validated():
    with pytest.raises(PluginError, match='face_detector config: min_score'):
        plugin('face_detector', min_score=2)
    with pytest.raises(PluginError, match='face_expression config: colour: Extra inputs'):
        plugin('face_expression', colour='red')
    with pytest.raises(PluginError, match='embedding: .*file not found'):
        plugin('embedding', model_path='/nonexistent/model.onnx')


def test_expression_plugin_on_a_crop_and_on_a_boxed_frame(astronaut):
    expression = plugin('expression')
    crop = frame_event(astronaut[70:190, 170:285].copy(), type='face.crop', png=True)
    [event] = expression.handle_event(crop).events
    assert event.type == 'face.expression' and event.json()['label'] == 'happy'
    boxed = frame_event(astronaut, type='face.crop', metadata={'box': '178,81,272,175'})
    [event] = expression.handle_event(boxed).events
    assert event.json()['label'] == 'happy' and event.confidence > 0.9
    bad = expression.handle_event(frame_event(astronaut, metadata={'box': '1,2,3'}))
    assert not bad.ok and 'x0,y0,x1,y1' in bad.error


def test_face_expression_plugin_is_flow_1(astronaut):
    flow = plugin('face_expression')
    frame = np.asarray(Image.fromarray(astronaut).resize((640, 480)))
    response = flow.handle_event(frame_event(frame, encoding='bgr8', privacy=Privacy.PRIVATE))
    assert response.ok, response.error
    [event] = response.events
    data = event.json()
    assert data['label'] == 'happy' and len(data['faces']) == 1
    assert data['faces'][0]['expression']['label'] == 'happy'
    assert event.privacy == Privacy.PRIVATE  # never lowered
    assert flow.handle_event(frame_event(np.zeros((480, 640, 3), np.uint8))).events == []


def test_embedding_plugin():
    embedding = plugin('embedding', granted=frozenset())
    response = embedding.handle_event(Event(type='text', payload=b'the robot sees a happy person'))
    assert response.ok, response.error
    [event] = response.events
    assert event.type == 'text.embedding' and event.metadata['dim'] == '384'
    vector = vectors_from_event(event)
    assert vector.shape == (1, 384) and abs(np.linalg.norm(vector) - 1.0) < 1e-5
    texts = ['a person is smiling', 'someone looks happy', 'the battery voltage is low']
    [event] = embedding.handle_event(Event(type='text', payload=json.dumps(
        {'texts': texts}).encode())).events
    a, b, c = vectors_from_event(event)
    assert a @ b > a @ c and a @ b > b @ c
    for payload in (b'', b'{"text": 3}', b'\xff\xfe', b'   '):
        bad = embedding.handle_event(Event(type='text', payload=payload))
        assert not bad.ok, payload
    assert embedding.health().details['bad_input'] == '4'


def test_one_detector_shared_by_threads_gives_the_same_answers(detector, classifier, astronaut):
    """A host may call a plugin from several executor threads: the reused input tensors and the
    interpreters are guarded, so concurrent frames neither crash nor mix."""
    from concurrent.futures import ThreadPoolExecutor
    expected = detector.detect(astronaut)[0].box

    def one(i: int):
        frame = astronaut if i % 2 == 0 else np.zeros_like(astronaut)
        faces = detector.detect(frame)
        labels = [classifier.classify_box(frame, f.box).label for f in faces]
        return i % 2, [f.box for f in faces], labels

    with ThreadPoolExecutor(4) as pool:
        for parity, boxes, labels in pool.map(one, range(40)):
            assert (boxes, labels) == (([expected], ['happy']) if parity == 0 else ([], []))


def test_msg_data_as_a_list_of_ints(astronaut):
    small = astronaut[:4, :5]
    msg = SimpleNamespace(width=5, height=4, encoding='rgb8', step=15,
                          data=list(small.tobytes()))
    np.testing.assert_array_equal(image_from_msg(msg), small)
