"""Every Loom topic name the package uses, in one place (the seed's topic routing table)."""
from loom_ros.bus.names import validate_topic

CAMERA_FRONT = 'camera.front'                # raw front camera frames as events
CAMERA_FRONT_FACE = 'camera.front.face'      # front camera face detections
MIC_PRIMARY_SPEECH = 'mic.primary.speech'    # primary microphone speech
SENSOR_IMU_MOTION = 'sensor.imu.motion'      # IMU motion events


def agent_intent(agent_id: str) -> str:
    """`agent.{id}.intent`: what an agent means to do."""
    return validate_topic(f'agent.{agent_id}.intent')


def agent_action(agent_id: str) -> str:
    """`agent.{id}.action`: what an agent asks actuators to do."""
    return validate_topic(f'agent.{agent_id}.action')


# Agent supervision (ROS topics outside the Loom event space: they carry AgentStatus, not Event).
AGENTS_HEARTBEAT = 'loom/agents/heartbeat'   # every agent, every heartbeat period
AGENTS_STATUS = 'loom/agents/status'         # the lifecycle manager's verdict per agent
DIAGNOSTICS = '/diagnostics'                 # diagnostic_msgs/DiagnosticArray, absolute

# The router node (relative to the robot's namespace).
ROUTER_ROUTE = 'router/route'                # loom_msgs/Route service: one decision per event
ROUTER_DECISIONS = 'router/decisions'        # loom_msgs/RouteDecision, every decision
ROUTER_OUTCOMES = 'router/outcomes'          # loom_msgs/RouteOutcome, what a route cost
ROUTER_STATS = 'router/stats'                # loom_msgs/RouterStats

# The storage node (relative to the robot's namespace).
STORAGE_STATS = 'storage/stats'              # loom_msgs/StorageStats: bytes, rows, moves per tier
STORAGE_QUERY = 'storage/query'              # loom_msgs/StorageQuery service: episodes, memories
STORAGE_CONSENT = 'storage/consent'          # loom_msgs/Consent service: grant, withdraw, show
AUDIT_HEAD = 'audit/head'                    # std_msgs/String 'ID:HASH', the audit chain's head
STORAGE_FORGET = 'storage/forget'            # loom_msgs/Forget service: erase a data subject
                                             # everywhere (storage root, bridge outbox, fleet)

# The Zenoh bridge node (relative to the robot's namespace).
BRIDGE_FORGET = 'zenoh_bridge/forget'        # loom_msgs/Forget service: drop a data subject's
                                             # events still waiting in the bridge's outbox
