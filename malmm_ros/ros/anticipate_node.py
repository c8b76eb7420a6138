"""malmm_anticipate: camera frames in, next-action predictions out on malmm/actions.

The image callback only asks the pipeline's sampler about the frame and hands the newest one to
a keep-latest slot; a worker thread decodes, runs the pipeline and publishes, so a slow step
never queues stale frames and never blocks the executor. This module converts messages, owns
the threads and publishes; the model, its memory and the sampling live in malmm_ros.pipeline.
With text.enabled, every n-th prediction's query outputs also go to a describer on a thread of
its own (ros/description_worker.py), which publishes malmm/description; it never delays
malmm/actions.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from malmm_ros.config import AnticipateConfig, field_specs
from malmm_ros.errors import ConfigError, FrameError, MalmmError, OutputError
from malmm_ros.imaging import decode_compressed, decode_image, encode_bgr8
from malmm_ros.pipeline import AnticipationPipeline, Prediction
from malmm_ros.pipeline.sampler import Admission
from malmm_ros.ros.description_worker import DescriptionWorker
from malmm_ros.ros.diagnostics import NodeStats, diagnostic_array, starved_message, timer_clock
from malmm_ros.ros.latest_slot import LatestSlot
from malmm_ros.ros.log_bridge import route_core_logging
from malmm_ros.ros.overlay import draw_overlay
from malmm_ros.ros.parameters import (
    READ_ONLY,
    config_from_parameters,
    declare_config_parameters,
    refuse_unknown_parameters,
)
from malmm_ros.runtime.bundle import BUNDLE_CHECKPOINT
from malmm_ros.stamps import stamp_ns

if TYPE_CHECKING:  # the text path needs torch; runtime onnx never loads it
    from malmm_ros.model.text import Description, TextDescriber

__all__ = ['AnticipateNode', 'main', 'run']

THROTTLE_S = 5.0


def _pipeline(config: AnticipateConfig) -> AnticipationPipeline:
    config.check_files(text=True)  # a missing file: one line naming its absolute path
    return AnticipationPipeline(config)


def _describer(config: AnticipateConfig) -> TextDescriber | None:
    """The text describer the config asks for (its projector from the checkpoint), or None."""
    if not config.text.enabled:
        return None
    from malmm_ros.model.checkpoint import load_text_projector
    from malmm_ros.model.text import TextDescriber

    checkpoint = config.checkpoint or (str(Path(config.bundle) / BUNDLE_CHECKPOINT)
                                       if config.bundle else '')
    projector = load_text_projector(checkpoint) if checkpoint else None
    return TextDescriber.from_config(config, projector=projector)


# Settings whose change needs the describer loaded again (the rest only change its options).
_DESCRIBER_SETTINGS = ('text.enabled', 'text.model_path', 'checkpoint', 'bundle', 'device',
                       'model.hidden_size')


class AnticipationMixin:
    """What the plain node and the managed (lifecycle) node share: loading the model, the
    topics, the callbacks and the worker. The node classes decide when each piece starts and
    stops; methods here only use rclpy's Node API, so either node class can host them."""

    pipeline: AnticipationPipeline | None
    config: AnticipateConfig

    def _init_state(self, dds_note: str) -> None:
        route_core_logging(self.get_logger())
        self.get_logger().info(dds_note)
        self.pipeline = None
        self.slot = LatestSlot()
        self.stats = NodeStats()
        self._pipeline_lock = threading.Lock()  # pipeline swap, reset and push
        self._last_prediction: Prediction | None = None
        self._predictions_undescribed = 0  # predictions since the last description request
        self.text: DescriptionWorker | None = None
        self._subscription = None
        self._outputs: list = []  # publishers, the reset service and the diagnostics timer
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._active = False  # taking frames (the managed node: its active state)

    def _load(self, config: AnticipateConfig) -> tuple[AnticipationPipeline,
                                                       TextDescriber | None]:
        """The pipeline and the describer `config` asks for; MalmmError names what is wrong."""
        pipeline = _pipeline(config)
        try:
            return pipeline, _describer(config)  # a bad text.model_path fails here
        except BaseException:
            pipeline.close()
            raise

    def _open_outputs(self, *, managed: bool) -> None:
        """Publishers, the reset service and the diagnostics timer. With `managed` the
        prediction topics are lifecycle publishers (silent unless active); /diagnostics and the
        labels are not, so a monitor sees an inactive node and what it would predict."""
        publisher = self.create_lifecycle_publisher if managed else self.create_publisher
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.actions_pub = publisher(String, 'malmm/actions', reliable)
        self.labels_pub = self.create_publisher(String, 'malmm/labels', latched)
        self.overlay_pub = publisher(Image, 'malmm/overlay', 1)
        self.description_pub = publisher(String, 'malmm/description', reliable)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._outputs = [self.actions_pub, self.labels_pub, self.overlay_pub,
                         self.description_pub, self.diagnostics_pub,
                         self.create_service(Trigger, '~/reset', self.reset_callback),
                         self.create_timer(1.0, self.diagnostics_callback,
                                           clock=timer_clock())]  # reports while sim time stops

    def _close_outputs(self) -> None:
        for entity in self._outputs:
            if entity in (self.actions_pub, self.overlay_pub, self.description_pub) and \
                    hasattr(self, 'destroy_lifecycle_publisher'):
                self.destroy_lifecycle_publisher(entity)
            elif hasattr(entity, 'srv_type'):
                self.destroy_service(entity)
            elif hasattr(entity, 'timer_period_ns'):
                self.destroy_timer(entity)
            else:
                self.destroy_publisher(entity)
        self._outputs = []

    def _resolve_input(self) -> None:
        """The input topic and type for the config's transport."""
        # image_transport's convention: the compressed stream is `<image topic>/compressed`,
        # so one remap of `image` serves both transports. An explicit remap of
        # `image/compressed` (older launch files) still wins.
        image_topic = self.resolve_topic_name('image')
        if self.config.input_transport == 'raw':
            self._input_kind, self.input_topic = Image, image_topic
        else:
            self._input_kind = CompressedImage
            explicit = self.resolve_topic_name('image/compressed')
            remapped = explicit != self.resolve_topic_name('image/compressed', only_expand=True)
            self.input_topic = explicit if remapped else f'{image_topic}/compressed'
        self.input_type = f'sensor_msgs/{self._input_kind.__name__}'

    def _open_input(self) -> None:
        """Start the worker, then subscribe: frames flow from here on."""
        self._resolve_input()  # the managed node may have changed transport while inactive
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._inference_loop, args=(self._stop,),
                                        name='malmm_inference', daemon=True)
        self._worker.start()
        qos = self.config.qos
        reliability = (ReliabilityPolicy.RELIABLE if qos.reliability == 'reliable'
                       else ReliabilityPolicy.BEST_EFFORT)
        camera_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=qos.depth,
                                reliability=reliability)
        with self.stats.lock:  # silence counts from here: an inactive node is not starved
            self.stats.count_from_now()
        self._subscription = self.create_subscription(
            self._input_kind, self.input_topic, self.image_callback, camera_qos)
        self._active = True

    def _close_input(self) -> None:
        """Unsubscribe and stop the worker after its current step; the memory stays."""
        self._active = False
        if self._subscription is not None:
            self.destroy_subscription(self._subscription)
            self._subscription = None
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=5.0)
            self._worker = None
        self.slot.clear()

    def _log_listening(self) -> None:
        qos = self.config.qos
        self.get_logger().info(
            f'listening on {self.input_topic} ({self.input_type}, {qos.reliability}, depth '
            f'{qos.depth}); {self.pipeline.model_name} on {self.pipeline.encoder.name}, '
            f'M={self.config.memory_bank_length}, sampling {self.config.sample_fps} fps, '
            f'trained={self.pipeline.trained}')
        if not self.pipeline.trained:
            self.get_logger().warning('no checkpoint: heads are untrained, predictions are '
                                      'meaningless (set the "checkpoint" parameter)')

    # -- callbacks --------------------------------------------------------------------------

    def image_callback(self, msg: Image | CompressedImage) -> None:
        """Sample (by stamp, by arrival when stamps fail) and hand the newest frame to the
        worker; never blocks, never decodes."""
        arrival = time.monotonic_ns()
        with self.stats.lock:
            self.stats.frames_in += 1
            self.stats.last_frame_time = arrival * 1e-9
            self.stats.camera.frame(arrival, self.get_clock().now().nanoseconds)
        try:
            stamp = stamp_ns(msg.header.stamp)
        except FrameError as exc:
            self._bad_frame(exc)
            return
        admission = self.pipeline.sampler.admit(stamp, arrival)
        if admission.reset_reason:
            self.get_logger().warning(f'memory reset: {admission.reset_reason}',
                                      throttle_duration_sec=THROTTLE_S)
        if not admission.accepted:
            return
        with self.stats.lock:
            self.stats.frames_sampled += 1
        self.slot.put((msg, admission))

    def reset_callback(self, request: Trigger.Request, response: Trigger.Response
                       ) -> Trigger.Response:
        """~/reset: forget the stream (memory, sampling grid)."""
        with self._pipeline_lock:
            self.pipeline.reset()
        with self.stats.lock:
            self.stats.memory_slots = 0
            self.stats.resets += 1
        self.slot.clear()
        self._last_prediction = None
        response.success, response.message = True, 'memory cleared'
        self.get_logger().info('memory reset by service call')
        return response

    def parameters_callback(self, params: list) -> SetParametersResult:
        """Apply a parameter change whole or refuse it with the reason; never half-apply."""
        # Only the config schema's parameters concern us; others (use_sim_time) pass through.
        schema = field_specs()
        changes = {p.name: p.value for p in params if p.name in schema}
        if not changes:
            return SetParametersResult(successful=True)
        frozen = sorted(set(changes) & READ_ONLY)
        if frozen and self._subscription is not None:
            return SetParametersResult(successful=False, reason=f'{", ".join(frozen)} cannot '
                                       'change at run time; restart the node')
        try:
            config = config_from_parameters(self, changes)
        except ConfigError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        if self.pipeline is None:  # the managed node before configure: it loads this config
            self.config = config
            return SetParametersResult(successful=True)
        old = self.config.to_parameters()
        new = config.to_parameters()
        reload_text = any(old[name] != new[name] for name in _DESCRIBER_SETTINGS)
        describer = self.text.describer if self.text is not None else None
        rebuilt = self.pipeline.rebuild_settings(config)
        try:
            # Everything is loaded before anything changes (a refusal leaves all as it was),
            # and outside the lock, so inference goes on while a new model loads.
            if reload_text:
                describer = _describer(config)
            pipeline = _pipeline(config) if rebuilt else None
        except MalmmError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        with self._pipeline_lock:
            if pipeline is None:
                self.pipeline.apply_settings(config)
            else:
                self.pipeline, old_pipeline = pipeline, self.pipeline
        if pipeline is not None:
            old_pipeline.close()
            self._publish_labels()
            with self.stats.lock:
                self.stats.memory_slots = 0
                self.stats.resets += 1
            self.get_logger().info(f'pipeline rebuilt for {", ".join(rebuilt)} (memory '
                                   f'cleared): {self.pipeline.model_name} on '
                                   f'{self.pipeline.encoder.name}, '
                                   f'trained={self.pipeline.trained}')
        self.config = config
        if reload_text and self.text is not None:
            self.text.describer = describer
            self._log_describer(describer)
        elif describer is not None:  # prompt, length, decoding: from the next description on
            from malmm_ros.model.text import GenerationOptions

            describer.options = GenerationOptions.from_config(config.text)
        return SetParametersResult(successful=True)

    def diagnostics_callback(self) -> None:
        pipeline = self.pipeline
        sampler = pipeline.sampler
        clock = self.get_clock()  # sim time with use_sim_time: a paused /clock is not silence
        quiet = self.stats.camera.check(time.monotonic_ns(), clock.now().nanoseconds,
                                        sim_time=clock.ros_time_is_active,
                                        stale_after_s=self.config.stale_after_s)
        starved = None
        if self._active and quiet.starved:
            starved = starved_message(self, self.input_topic, quiet.silence_s,
                                      never=quiet.never, clock=quiet.clock)
            self.get_logger().warning(starved, throttle_duration_sec=THROTTLE_S)
        problem = None
        if sampler.problem:
            how = 'by arrival time' if sampler.by_arrival else 'by stamp'
            problem = f'frame stamps unusable: {sampler.problem}; sampling {how}'
            self.get_logger().warning(problem, throttle_duration_sec=THROTTLE_S)
        extra = {'input_topic': self.input_topic, 'input_type': self.input_type,
                 'rate_limited': sampler.rate_limited,
                 'memory_clock': 'arrival' if sampler.by_arrival else 'stamp',
                 **self._state_values()}
        self.diagnostics_pub.publish(diagnostic_array(
            # `left/malmm_anticipate: ...` with a namespace, so cameras' statuses differ
            self.get_clock().now().to_msg(),
            name=f'{self.get_fully_qualified_name().lstrip("/")}: anticipation',
            hardware_id=pipeline.encoder.name, stats=self.stats, dropped=self.slot.dropped,
            backend=pipeline.encoder.name, device=self.config.device,
            trained=pipeline.trained, starved=starved, stamp_problem=problem, extra=extra,
            text=self._text_values(), staleness=quiet))

    # -- worker -----------------------------------------------------------------------------

    def _inference_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            item = self.slot.take(timeout=0.2)
            if item is None:
                continue
            try:
                self._process(*item)
            except Exception as exc:  # the worker must outlive any one frame
                if stop.is_set() or not self.context.ok():
                    return  # shutting down (SIGINT/SIGTERM): nothing left to publish to
                with self.stats.lock:
                    self.stats.errors += 1
                self.get_logger().error(f'inference step failed: {exc!r}',
                                        throttle_duration_sec=THROTTLE_S)

    def _process(self, msg: Image | CompressedImage, admission: Admission) -> None:
        side = self.config.max_image_side
        try:
            if isinstance(msg, CompressedImage):
                image = decode_compressed(msg.format, msg.data, max_side=side)
            else:
                image = decode_image(msg.encoding, msg.width, msg.height, msg.step,
                                     bool(msg.is_bigendian), msg.data, max_side=side)
            with self._pipeline_lock:
                resets_before = self.pipeline.stats['resets']
                prediction = self.pipeline.push(image, stamp_ns(msg.header.stamp),
                                                msg.header.frame_id, admission=admission)
                queries = self.pipeline.last_queries  # the step that made `prediction`
                latency = self.pipeline.last_latency_ms
                resets = self.pipeline.stats['resets'] - resets_before
                slots = len(self.pipeline.memory)
        except FrameError as exc:
            self._bad_frame(exc)
            return
        except OutputError as exc:  # never published: counted as an error
            with self.stats.lock:
                self.stats.errors += 1
            self.get_logger().error(str(exc), throttle_duration_sec=THROTTLE_S)
            return
        with self.stats.lock:
            self.stats.processed += 1
            self.stats.resets += resets
            self.stats.memory_slots = slots
            self.stats.step_ms.append(sum(latency.values()))
        if prediction is not None:
            self._last_prediction = prediction
            self.actions_pub.publish(String(data=prediction.to_json()))
            with self.stats.lock:
                self.stats.predictions += 1
            self._request_description(prediction, queries)
        if self.overlay_pub.get_subscription_count() > 0:  # no drawing when nobody watches
            width, height, step, data = encode_bgr8(draw_overlay(image, self._last_prediction))
            overlay = Image(header=msg.header, height=height, width=width, encoding='bgr8',
                            is_bigendian=0, step=step, data=data)
            self.overlay_pub.publish(overlay)

    def _bad_frame(self, exc: FrameError) -> None:
        with self.stats.lock:
            self.stats.bad_frames += 1
        self.get_logger().warning(f'bad frame skipped: {exc}', throttle_duration_sec=THROTTLE_S)

    def _request_description(self, prediction: Prediction, queries: object) -> None:
        """Every text.every_n_predictions predictions, hand the queries to the describer."""
        if self.text is None or self.text.describer is None or queries is None:
            return
        self._predictions_undescribed += 1
        if self._predictions_undescribed < self.config.text.every_n_predictions:
            return
        self._predictions_undescribed = 0
        from malmm_ros.model.text import Grounding  # loaded already: the describer is

        self.text.submit(queries, prediction.stamp_ns, prediction.frame_id,
                         Grounding.from_prediction(prediction))

    def _publish_description(self, description: Description) -> None:
        self.description_pub.publish(String(data=json.dumps(description.to_dict(),
                                                            allow_nan=False)))

    def _description_failed(self, exc: BaseException) -> None:
        self.get_logger().error(f'text description failed: {exc!r}',
                                throttle_duration_sec=THROTTLE_S)

    def _text_values(self) -> dict[str, object] | None:
        describer = self.text.describer if self.text is not None else None
        if describer is None:
            return None
        return {'text_model': describer.name, 'text_trained': describer.trained,
                **self.text.values()}

    def _log_describer(self, describer: TextDescriber | None) -> None:
        if describer is None:
            return
        self.get_logger().info(f'text descriptions by {describer.name} every '
                               f'{self.config.text.every_n_predictions} predictions, '
                               f'trained projector={describer.trained}')
        if not describer.trained:
            self.get_logger().warning('the checkpoint has no text projector: descriptions are '
                                      'meaningless (train one with malmm-train --task caption)')

    def _publish_labels(self) -> None:
        labels = self.pipeline.labels.to_dict()
        labels['schema'] = 'malmm_ros/labels/v1'
        labels['trained'] = self.pipeline.trained
        self.labels_pub.publish(String(data=json.dumps(labels, allow_nan=False)))

    def _state_values(self) -> dict[str, object]:
        """Diagnostics values of the node's own state (the managed node adds its lifecycle)."""
        return {}

    def stop(self) -> None:
        """Stop the worker and describer threads (called before the node is destroyed)."""
        self._close_input()
        if self.text is not None:
            self.text.stop()


class AnticipateNode(AnticipationMixin, Node):
    """Subscribes to `image` (or `image/compressed`), publishes malmm/actions and friends;
    loads everything and starts taking frames in its constructor."""

    def __init__(self, dds_note: str = 'DDS: the environment\'s settings') -> None:
        super().__init__('malmm_anticipate')
        self._init_state(dds_note)
        self.config = declare_config_parameters(self)
        refuse_unknown_parameters(self)
        self.pipeline, describer = self._load(self.config)
        self._resolve_input()
        self._open_outputs(managed=False)
        self.add_on_set_parameters_callback(self.parameters_callback)
        self._publish_labels()
        self.text = DescriptionWorker(describer, self._publish_description,
                                      self._description_failed)
        self._open_input()
        self._log_describer(describer)
        self._log_listening()


def run(args: list[str] | None = None, *, dds_note: str = 'DDS: the environment\'s settings',
        managed: bool = False) -> int:
    """Start ROS, run the node until Ctrl-C or shutdown; 0 on a clean end, 1 on a MalmmError.

    `managed`: the lifecycle node (ros/managed_node.py), which starts unconfigured.

    A signal during start-up shuts the context down under the node's feet, so rcl calls may
    fail (RCLError "context is invalid") before KeyboardInterrupt arrives: any failure while
    the context is no longer ok is an interrupted start, not an error.
    """
    node = None
    try:
        rclpy.init(args=args)
        if managed:
            from malmm_ros.ros.managed_node import ManagedAnticipateNode

            node = ManagedAnticipateNode(dds_note)
        else:
            node = AnticipateNode(dds_note)
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:
        if not rclpy.ok():
            return 0
        if isinstance(exc, MalmmError):
            print(f'ERROR: {exc}', file=sys.stderr)
            return 1
        raise
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def main(args: list[str] | None = None) -> int:
    """The checked entry point (malmm_ros.ros.anticipate_main): --help, DDS profile, signals."""
    from malmm_ros.ros.anticipate_main import main as checked_main

    return checked_main(args)


if __name__ == '__main__':
    sys.exit(main())
